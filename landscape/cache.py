"""Where landscape keeps what it builds once: converted models, trained reference models, token caches.

The location is ``$LANDSCAPE_CACHE`` if set, else the platform's user cache dir (``~/.cache/landscape``
on Linux). Everything in it can be deleted; it is rebuilt on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import platformdirs


def cache_dir() -> Path:
    """Root of the landscape cache (created on first use)."""
    root = Path(os.environ.get("LANDSCAPE_CACHE") or platformdirs.user_cache_dir("landscape"))
    root.mkdir(parents=True, exist_ok=True)
    return root


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
