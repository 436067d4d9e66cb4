"""The one error handler of every entry point (``landscape``, the figure and study scripts).

Expected failures (bad input, a store or result that cannot be used, a write that failed, a missing file)
print one ``error:`` line that says what, with the value and what is accepted or what to do, and exit 2.
Anything else is a bug: one line naming it and asking for ``--debug``, exit 1. ``--debug`` (anywhere on the
command line) shows the traceback instead. Ctrl-C says how many points each unfinished store keeps and the
command that resumes it, and exits 130.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence

from landscape import interrupts
from landscape.cluster import SweepError
from landscape.store.files import interrupted_runs

DEBUG_FLAG = "--debug"
EXPECTED: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, MemoryError, SweepError)


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    argv = list(argv)
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def resume_command(program: str, argv: Sequence[str]) -> str:
    """The command line that resumes an interrupted run: the same one, with ``--resume``."""
    argv = list(argv)
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join([program, *argv])


def run_guarded(run: Callable[[], int | None], program: str, argv: Sequence[str], debug: bool = False,
                resumable: bool = True) -> int:
    """Call ``run()`` and turn what it raises into an exit status and one line on stderr (module docstring).

    Args:
        run: the entry point's work; its return value (None = 0) is the exit status.
        program, argv: how it was started (for the resume command after Ctrl-C).
        debug: re-raise instead of printing one line.
        resumable: the command takes ``--resume`` (else the Ctrl-C message does not offer it).
    """
    try:
        with interrupts.guard():  # a Ctrl-C that a finalizer swallows still stops the run at its next point
            return int(run() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(interrupted_message(program, argv, resumable), file=sys.stderr)
        return 130
    except EXPECTED as err:
        if debug:
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch reports running out of memory as a RuntimeError
        if debug:
            raise
        if out_of_memory(err):
            print(f"error: {describe(MemoryError(str(err).splitlines()[0]))}", file=sys.stderr)
            return 2
        return _bug(err)
    except Exception as err:  # a bug: say so in one line
        if debug:
            raise
        return _bug(err)


def _bug(err: BaseException) -> int:
    print(f"error: unexpected {type(err).__name__}: {describe(err)} (this is a bug in landscape: run the "
          f"same command with {DEBUG_FLAG} for the traceback and report it)", file=sys.stderr)
    return 1


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch's way of saying it ran out of memory (CPU allocator or CUDA)."""
    text = str(err)
    return isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def describe(err: BaseException) -> str:
    """An exception as one message: ``str(err)`` (a KeyError's without its quotes), else its type."""
    if isinstance(err, MemoryError):
        return ("out of memory" + (f" ({err})" if str(err) else "") +
                ": choose a smaller grid, fewer directions or points, or a smaller batch (--batch-size)")
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def interrupted_message(program: str, argv: Sequence[str], resumable: bool = True) -> str:
    """What Ctrl-C left: each unfinished store with its finished points, and how to resume."""
    runs = interrupted_runs()
    if not runs:
        return "interrupted: no store was being written; nothing to resume"
    kept = "; ".join(f"{done} of {total} points kept in {path}" for path, (done, total) in runs.items())
    if not resumable:
        return f"interrupted: {kept}"
    return f"interrupted: {kept}. Resume with: {resume_command(program, argv)}"


def script_main(main: Callable[[list[str]], int | None], module: str) -> int:
    """The ``__main__`` of an analysis script: ``main(argv)`` under :func:`run_guarded`, ``--debug`` taken
    from the command line (``main`` itself raises, as the jobs of a fanned-out sweep need)."""
    argv, debug = split_debug(sys.argv[1:])
    return run_guarded(lambda: main(argv), f"python -m {module}", argv, debug, resumable=False)
