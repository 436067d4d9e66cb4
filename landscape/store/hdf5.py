"""The HDF5 files under the stores: their layout constants and errors, reading a store whole (with every
check of its layout and checksums), and what the writer needs of the file system: its lock, the errors h5py
reports only in destructors, free space and file-size limits, and datasets allocated at once with
``fletcher32`` checksums.

See :mod:`landscape.store` for the layout and the guarantees; :mod:`landscape.store.files` writes stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:
    import fcntl
    import resource
except ImportError:  # pragma: no cover - not POSIX: no lock of our own (HDF5's still applies), no ulimit
    fcntl = resource = None

STORE_FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
DONE = "done"
CHECKSUM_ATTR = "landscape_sha256"  # the sha256 of an unchunked dataset's value (no fletcher32 there)
ArraySpec = tuple[tuple[int, ...], Any]  # (point shape, numpy dtype-like)

class StoreError(ValueError):
    """A store that cannot be used: unreadable, truncated, not a landscape store, or a forbidden write."""


class StoreMismatchError(StoreError):
    """An existing store was written for a different run (another model, data set, grid, directions...)."""


class StoreWriteError(StoreError):
    """Writing a store failed (a full disk, a file-size limit, an I/O error): the run stopped at the first
    failure and the message says what is left on disk (a resumable ``.partial``, or a file to delete)."""


class StoreInProgressError(StoreError):
    """A store whose run has not finished: its writer is still running (the file is locked), or the run
    stopped early and only its ``.partial`` file exists (resume it)."""


def partial_path(path: str | os.PathLike) -> Path:
    """Where a store lives while its run is unfinished: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)



# ------------------------------------------------------------------------------------------ the reader
@dataclass(frozen=True)
class StoreData:
    """Everything in a store, as numpy arrays.

    Attributes:
        arrays: dataset path -> array: point arrays (shape ``grid_shape + point_shape``; values where
            ``done`` is False are fill values), finished arrays, and table columns (``table/column``).
        done: boolean mask of finished points (shape ``grid_shape``).
        provenance: the run's JSON provenance.
        point_arrays: names of the arrays written point by point.
        grid_shape: shape of the grid of points.
    """

    arrays: dict[str, np.ndarray]
    done: np.ndarray
    provenance: dict[str, Any]
    point_arrays: tuple[str, ...]
    grid_shape: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def table(self, name: str) -> dict[str, np.ndarray]:
        """The columns of a table written with :meth:`ResultStore.write_table`."""
        prefix = name + "/"
        columns = {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}
        if not columns:
            raise KeyError(f"no table {name!r} in this store")
        return columns


def read_store(path: str | os.PathLike) -> StoreData:
    """Read a whole store (finished, or a ``.partial`` one by that name) into numpy arrays.

    Raises:
        StoreInProgressError: the run has not finished: only its partial file exists, or a writer holds the
            file.
        StoreError: missing, unreadable (corrupted, truncated) or not a landscape store.
    """
    path = Path(path)
    unfinished = partial_path(path).exists()  # looked at first: finish() renames the partial file to path
    if not path.exists():
        if unfinished:
            raise StoreInProgressError(f"no finished store at {path} (an unfinished run is at "
                                       f"{partial_path(path)}: in progress, or stopped and resumable; "
                                       f"readable once no writer holds it)")
        raise StoreError(f"no store at {path}")
    try:
        file = h5py.File(path, "r")
    except BlockingIOError:
        raise StoreInProgressError(f"{path} is open for writing by another process (a run in progress): "
                                   f"read it when the writer has finished or stopped") from None
    except FileNotFoundError:
        raise StoreError(f"no store at {path} "
                         f"(it was moved away as it was opened: its run just finished?)") from None
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 store (corrupted, truncated, or open for writing "
                         f"by another process): {err}") from None
    with file:
        if file.attrs.get("landscape_store") != STORE_FORMAT_VERSION:
            raise StoreError(f"{path} is not a landscape result store of format version "
                             f"{STORE_FORMAT_VERSION} (found version {file.attrs.get('landscape_store')!r})")
        try:
            provenance, grid, point_arrays = _layout(file)
            arrays: dict[str, np.ndarray] = {}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    value = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
                    recorded = obj.attrs.get(CHECKSUM_ATTR)
                    if recorded is not None and recorded != _digest(value):
                        raise OSError(f"the checksum of {name!r}: its value does not match the sha256 "
                                      f"recorded when it was written")
                    if name != DONE:
                        arrays[name] = value

            file.visititems(visit)
            done = file[DONE][()] if DONE in file else None
        except (OSError, KeyError, ValueError, TypeError) as err:
            if "filter returned failure" in str(err) or "checksum" in str(err):
                raise StoreError(f"{path} is damaged: a checksum (fletcher32, or the sha256 of a single "
                                 f"value) does not match its data: the file was changed or damaged on disk "
                                 f"after it was written; recompute it (its run's command again, into a new "
                                 f"file)") from None
            raise StoreError(f"{path} is damaged: {err}") from None
    problem = _layout_problem(arrays, done, grid, point_arrays)
    if problem:
        raise StoreError(f"{path} is damaged: {problem}")
    arrays = {**{n: arrays[n] for n in point_arrays}, **arrays}
    return StoreData(arrays, done, provenance, point_arrays, grid)


def _layout(file: h5py.File) -> tuple[dict[str, Any], tuple[int, ...], tuple[str, ...]]:
    """A store file's provenance, grid shape and point array names from its root attributes, each checked
    (``ValueError`` naming the attribute otherwise)."""
    missing = [a for a in ("provenance", "grid_shape", "point_arrays") if a not in file.attrs]
    if missing:
        raise ValueError(f"its root attributes {missing} are missing")
    try:
        provenance = json.loads(file.attrs["provenance"])
    except (TypeError, ValueError):
        raise ValueError("its provenance attribute is not JSON") from None
    if not isinstance(provenance, dict):
        raise ValueError(f"its provenance attribute is a JSON {type(provenance).__name__}, not an object")
    shape = np.asarray(file.attrs["grid_shape"])
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or (shape < 1).any():
        raise ValueError(f"its grid_shape attribute {shape.tolist()!r} is not a list of positive integers")
    try:
        names = json.loads(file.attrs["point_arrays"])
    except (TypeError, ValueError):
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"its point_arrays attribute {file.attrs['point_arrays']!r} is not a JSON list of "
                         f"array names")
    return provenance, tuple(int(n) for n in shape), tuple(names)


def _layout_problem(arrays: Mapping[str, np.ndarray], done: np.ndarray | None, grid: tuple[int, ...],
                    point_arrays: Sequence[str]) -> str | None:
    """What is wrong with a store's done mask and point arrays, or None."""
    if done is None:
        return f"it has no {DONE!r} mask"
    if done.dtype != np.bool_:
        return f"its {DONE!r} mask holds {done.dtype}, not booleans"
    if done.shape != grid:
        return f"its {DONE!r} mask has shape {done.shape}, the grid {grid}"
    for name in point_arrays:
        if name not in arrays:
            return f"its point array {name!r} is missing"
        array = np.asarray(arrays[name])
        if array.shape[:len(grid)] != grid:
            return (f"its point array {name!r} has shape {array.shape}, which does not start with the grid "
                    f"{grid}")
        if array.dtype.kind not in "biufc":
            return f"its point array {name!r} holds {array.dtype} values, not numbers"
    return None


class _WriterLock:
    """An exclusive ``fcntl`` lock on ``<store path>.lock``, held while a run writes the store."""

    def __init__(self, path: Path, handle: Any):
        self.path = path
        self._handle = handle

    @classmethod
    def acquire(cls, store: Path) -> _WriterLock:
        path = store.with_name(store.name + ".lock")
        if fcntl is None:  # pragma: no cover - not POSIX
            return cls(path, None)
        while True:
            handle = open(path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise StoreInProgressError(
                    f"another process is writing the store {store} (it holds {path.name}): wait for it to "
                    f"finish or stop it; two runs must not write one store") from None
            try:  # the lock file may have been removed by the writer we waited for: lock the current one
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, handle)
            handle.close()

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        self._handle.close()  # closing the file lets the lock go
        self._handle = None


@contextlib.contextmanager
def _reported_h5py_errors() -> Iterator[list[BaseException]]:
    """Collect the exceptions that h5py raises in destructors (printed as "Exception ignored in ...
    ObjectID.__dealloc__" otherwise) while the block runs: a write that failed there failed."""
    errors: list[BaseException] = []
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, (OSError, RuntimeError)):
            errors.append(unraisable.exc_value)
        else:  # pragma: no cover - not ours to judge
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield errors
    finally:
        sys.unraisablehook = previous


def _reason(err: BaseException) -> str:
    """The useful part of an HDF5 / OS error: its errno's words when it has one (``File too large``, ``No
    space left on device``), else its first line."""
    text = str(err)
    if "error message = '" in text:
        return text.split("error message = '", 1)[1].split("'", 1)[0]
    errno = getattr(err, "errno", None)
    if errno:
        return os.strerror(errno)
    return text.splitlines()[0] if text else type(err).__name__


def store_bytes(specs: Mapping[str, ArraySpec], grid_shape: Sequence[int]) -> int:
    """Bytes a new store takes on disk: its point arrays and done mask, plus about 4 KiB of HDF5 metadata
    and chunk index per dataset (measured: 41 KB on 16 datasets) and 8 KiB for the file's own."""
    points = int(np.prod(grid_shape, dtype=np.int64))
    per_point = 1 + sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                        for shape, dtype in specs.values())
    return points * per_point + 4096 * (len(specs) + 1) + 8192


def check_free_space(path: str | os.PathLike, needed: int, margin: float = 1.1) -> None:
    """Raise :class:`StoreError` before any work unless the file system of ``path`` has ``needed`` bytes
    (times ``margin``) free."""
    ancestor = Path(path).absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    free = shutil.disk_usage(ancestor).free
    if needed * margin > free:
        raise StoreError(f"the store {path} needs about {_bytes(needed)} but {ancestor} has {_bytes(free)} "
                         f"free: make room, or choose a smaller grid or fewer directions")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if limit != getattr(resource, "RLIM_INFINITY", -1) and limit >= 0 and needed * margin > limit:
        raise StoreError(f"the store {path} needs about {_bytes(needed)} but this process may write files "
                         f"of at most {_bytes(limit)} (ulimit -f): raise the limit, or choose a smaller grid "
                         f"or fewer directions")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


def _create_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any,
                    data: np.ndarray | None = None) -> h5py.Dataset:
    """A dataset whose space is allocated when it is created (``H5D_ALLOC_TIME_EARLY``: a full disk shows
    then, not at a later point) with a ``fletcher32`` checksum per chunk when it holds numbers in more than
    one element (HDF5 verifies it on every read). Strings and single numbers, which HDF5 cannot chunk, carry
    the sha256 of their value in an attribute instead (:func:`seal`), verified by :func:`read_store`."""
    numeric = not h5py.check_string_dtype(np.dtype(dtype)) and np.dtype(dtype).kind in "biuf"
    if not numeric or int(np.prod(shape, dtype=np.int64)) <= 1:
        if data is not None:
            ds = group.create_dataset(name, data=data)
        else:
            ds = group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=_fill_value(np.dtype(dtype)))
        seal(ds)
        return ds
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    ds = group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=_fill_value(np.dtype(dtype)),
                              fletcher32=True, chunks=True, dcpl=dcpl)
    if data is not None:
        ds[()] = data
    return ds


def seal(ds: h5py.Dataset) -> None:
    """Record the sha256 of an unchunked dataset's value (a single number, strings) in its attribute
    :data:`CHECKSUM_ATTR`; call it again after every write. Chunked datasets have ``fletcher32``."""
    if ds.chunks is None:
        ds.attrs[CHECKSUM_ATTR] = _digest(ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()])


def _digest(value: Any) -> str:
    array = np.asarray(value)
    if array.dtype.kind in "OUS":
        payload = "\0".join(str(v) for v in array.ravel()).encode("utf-8")
    else:
        payload = array.tobytes()
    return hashlib.sha256(payload).hexdigest()


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if dtype.kind in "fc" else (False if dtype.kind == "b" else 0)
