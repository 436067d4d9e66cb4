"""Ctrl-C that cannot be lost.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be. When that is a
finalizer (a ``__del__``, a weakref callback such as h5py's or ``WeakValueDictionary``'s), the interpreter
prints "Exception ignored in ..." and carries on: a long sweep then ignores the user's Ctrl-C (seen on a
loaded machine: a scan went on for minutes after it). :func:`guard` installs a handler that also records the
interrupt, and :func:`check` raises it again at a safe point: every :meth:`ResultStore.write_point
<landscape.store.ResultStore.write_point>` calls it once the point is on disk, so a swallowed Ctrl-C stops
the run at the next finished point at the latest.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

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
    _pending = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False
