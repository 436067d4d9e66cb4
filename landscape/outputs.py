"""Output locations, checked before any work: a run that cannot write its result must fail at once.

Every entry point that ends by writing a file (a result store, a saved quantized model, a CLI ``--out``)
calls :func:`check_output_path` before it loads a model or computes anything, so an unwritable location
costs nothing and leaves nothing behind. Missing parent directories are fine (they are created when the
result is written), as long as the nearest existing one is a directory this process may write into.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written: its directory is a file, not writable, or it names a
    directory."""


def check_output_path(path: str | os.PathLike) -> Path:
    """Raise :class:`OutputPathError` unless a file can be created at ``path``; returns it as a :class:`Path`.

    Accepted: a path whose nearest existing ancestor is a directory with write and search permission
    (missing directories below it will be created), and which is not itself an existing directory.
    Permission is as the OS reports it (``os.access``): for root only a read-only file system or a file
    standing where a directory should be make a location unwritable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"output path {path} is a directory; give a file path inside it")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a directory; "
                              f"choose an output path in a writable directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: directory {ancestor} is not writable; "
                              f"choose an output path in a writable directory")
    return path
