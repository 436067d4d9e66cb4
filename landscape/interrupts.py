"""Ctrl-C that cannot be lost.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be. When that is a
finalizer (a ``__del__``, a weakref callback such as h5py's or ``WeakValueDictionary``'s), the interpreter
prints "Exception ignored in ..." and carries on: a long sweep then ignores the user's Ctrl-C (seen on a
loaded machine: a scan went on for minutes after it). :func:`guard` installs a handler that also records the
interrupt, and :func:`check` raises it again at a safe point: every :meth:`ResultStore.write_point
<landscape.store.ResultStore.write_point>` calls it once the point is on disk, so a swallowed Ctrl-C stops
the run at the next finished point at the latest. The interpreter's "Exception ignored" report of such a
swallowed interrupt (a traceback on the user's terminal for what is not an error) is silenced under the
guard; every other unraisable exception still reaches the previous ``sys.unraisablehook``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

_pending = False


def _on_sigint(signum: int, frame: object) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def pending() -> bool:
    """Whether a Ctrl-C arrived under :func:`guard` and has not been handled yet."""
    return _pending


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived (and may have been swallowed by a finalizer)."""
    if _pending:
        raise KeyboardInterrupt


def _quiet_swallowed_interrupts(previous: Callable[[sys.UnraisableHookArgs], object]
                                ) -> Callable[[sys.UnraisableHookArgs], None]:
    """A ``sys.unraisablehook`` that drops the KeyboardInterrupt of a Ctrl-C that a finalizer swallowed (it is
    pending, so :func:`check` raises it at the next safe point) and passes anything else to ``previous``."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if not (_pending and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous(unraisable)

    return hook


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` and is remembered for :func:`check`; the previous
    handler and a clear state are restored on exit. Outside the main thread (where Python delivers no signals)
    nothing is installed."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_swallowed_interrupts(previous_hook)
    _pending = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _pending = False
