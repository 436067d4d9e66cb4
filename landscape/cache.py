"""Where landscape keeps what it builds once: converted models, trained reference models, token caches.

The location is ``$LANDSCAPE_CACHE`` if set, else the platform's user cache dir (``~/.cache/landscape``
on Linux). Everything in it can be deleted; it is rebuilt on demand. Entries are built under
:func:`building`, so the jobs of a sweep that start together on an empty cache build each entry once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: cache entries are built without a lock
    fcntl = None


def cache_dir() -> Path:
    """Root of the landscape cache (created on first use)."""
    root = Path(os.environ.get("LANDSCAPE_CACHE") or platformdirs.user_cache_dir("landscape"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def building(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock (``<target>.lock``, ``fcntl``) while the cache entry ``target`` is built.

    Concurrent processes (the jobs of a sweep on one machine or a shared file system) queue here: the first
    builds the entry, the others must look for it again once they hold the lock, and use it instead of
    building (and replacing) it while it is being read. Without ``fcntl`` (Windows) there is no lock.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object (sorted keys), for cache keys and provenance."""
    payload = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:n]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Full sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
