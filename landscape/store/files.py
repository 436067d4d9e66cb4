"""The writer of one run's store (a file, or memory), the checks before it starts and on resume, and the
provenance helpers; reading and the file system below it are in :mod:`landscape.store.hdf5`.

See :mod:`landscape.store` for the layout and the guarantees.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from landscape import interrupts
from landscape.outputs import check_output_path
from landscape.store.hdf5 import (
    DONE,
    STORE_FORMAT_VERSION,
    ArraySpec,
    StoreData,
    StoreError,
    StoreInProgressError,
    StoreMismatchError,
    StoreWriteError,
    _create_dataset,
    _fill_value,
    _reason,
    _reported_h5py_errors,
    _WriterLock,
    check_free_space,
    partial_path,
    read_store,
    seal,
    store_bytes,
)
from landscape.version import __version__

# Set in a job of a fanned-out sweep (landscape.cluster): the writer keeps a small JSON file beside each
# partial store with its number of finished points, for the driver (HDF5 locks the store while written).
PROGRESS_ENV = "LANDSCAPE_REPORT_PROGRESS"
# Provenance keys that describe how a run was executed, not what it computed: two runs that differ only
# in these hold the same results (a resumed run keeps its store's keys; merging drops "shard").
RUN_SPECIFIC_KEYS: tuple[str, ...] = ("created", "shard", "merged_from")

# What stores written before these keys existed computed in: a missing key there means this value.
# A store without "shard" (a merged one, or a run that records no shard) holds the whole run: shard 0 of 1.
OLDER_DEFAULTS: dict[str, Any] = {"model_info.device": "cpu", "device": "cpu", "dtype": "float32",
                                  "shard.index": 0, "shard.count": 1}
# Keys that stores written before them do not hold, with no value to assume: such a store is not compared on
# them (a resume of an older store goes on; a store that holds the key must match it).
UNRECORDED_BEFORE: tuple[str, ...] = ("torch_threads", "quantized.*.sha256")  # fnmatch patterns


def check_store_path(path: str | os.PathLike, resume: bool = False) -> Path:
    """Raise before any work unless a run can write its store at ``path``: a writable location
    (:func:`~landscape.outputs.check_output_path`) and, without ``resume``, neither ``path`` nor its
    partial file already there. Returns ``path`` as a :class:`Path`."""
    path = check_output_path(path)
    partial = partial_path(path)
    if partial.exists():
        _check_partial_readable(partial)
    if not resume:
        if path.exists():
            raise StoreError(f"{path} already exists: resume its run (--resume) to check it is this one, or "
                             f"remove it to start over")
        if partial.exists():
            raise StoreError(f"{partial} (an unfinished run) already exists: resume it (--resume), or remove "
                             f"it to start over")
    return path


def _check_partial_readable(partial: Path) -> None:
    """Raise a :class:`StoreError` that says to delete ``partial`` if it cannot be read (a write that
    failed, a disk that filled); a partial file held by a running writer passes."""
    try:
        read_store(partial)
    except StoreInProgressError:
        return
    except StoreError as err:
        raise StoreError(f"{partial} is left from a run that stopped while writing and cannot be read back "
                         f"({err}): delete it, then run the command again (its points are lost)") from None


def progress_path(partial: str | os.PathLike) -> Path:
    """The progress file beside a partial store (written only in a sweep's jobs, see :data:`PROGRESS_ENV`)."""
    partial = Path(partial)
    return partial.with_name(partial.name + ".progress")


def code_version() -> str:
    return __version__


# ------------------------------------------------------------------------------------------ the writer
class ResultStore:
    """An open store being written (or a finished one opened for a resume check). Use :meth:`create`,
    :meth:`open_run` or :meth:`resume`; close with :meth:`finish` (complete) or :meth:`close` (unfinished).

    The one writer of every store file. While it writes it holds an ``fcntl`` lock of its own on
    ``<path>.lock`` (so two writers are exclusive even with ``HDF5_USE_FILE_LOCKING=FALSE``), keeps every
    dataset open (HDF5 then reports a failed write at the flush that follows it, not later in a destructor),
    and checks every operation: the first write that fails stops the run with :class:`StoreWriteError`,
    whose message says whether the ``.partial`` file is still readable (and so resumable, with how many
    points) or must be deleted. :meth:`finish` re-reads the closed file (every dataset's ``fletcher32``
    checksum) and moves it into place only if it holds every point this writer marked done.
    """

    def __init__(self, file: h5py.File, path: Path, grid_shape: tuple[int, ...],
                 specs: Mapping[str, ArraySpec], lock: _WriterLock | None = None):
        self._file = file
        self.path = path  # the final path
        self.grid_shape = grid_shape
        self._specs = dict(specs)
        self.point_arrays = tuple(specs)
        self._lock = lock
        self._failed = False
        self._datasets: dict[str, h5py.Dataset] = {}
        if self.writable:
            with self._checked("open"):
                self._datasets = {n: file[n] for n in (DONE, *self.point_arrays)}
                self._done = np.array(file[DONE][()], dtype=bool)  # an array even for a single-point store
        else:
            self._done = np.array(file[DONE][()], dtype=bool)
        self._report_progress()

    # ---------------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
               grid_shape: Sequence[int] = ()) -> ResultStore:
        """Start a new store at ``<path>.partial`` (refused if ``path`` or the partial file exists).

        The file's whole space is allocated here (every point array at its final size, ``fletcher32``
        checksums on every array of more than one value), after checking the file system has room for
        it: a full disk or a file-size limit is met now, before any work, not at the hundredth point.

        Args:
            provenance: JSON-serialisable description of the run; ``code_version`` and ``created``
                (UTC, ISO 8601) are added unless present.
            arrays: point array name -> ``(point_shape, dtype)``; stored with shape
                ``grid_shape + point_shape``.
            grid_shape: shape of the grid of points (``()`` for a store with a single point).

        Raises:
            OutputPathError: ``path`` cannot be written; StoreError: it (or its partial file) exists already,
            or the file system has no room for it; StoreInProgressError: another process writes it;
            StoreWriteError: writing the empty store failed.
        """
        path, partial = Path(path), partial_path(path)
        grid, specs = _check_schema(arrays, grid_shape)
        prov = _stamped(provenance)
        check_store_path(path)
        check_free_space(path, store_bytes(specs, grid))
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock.acquire(path)
        try:
            check_store_path(path)  # again, now that no other writer can start it
            # The empty store is written under a temporary name and renamed: a run killed while creating
            # it leaves no .partial that cannot be read (a new HDF5 file is unreadable until first flushed).
            fresh = partial.with_name(partial.name + ".new")
            try:
                with _reported_h5py_errors() as errors:
                    with h5py.File(fresh, "w") as file:
                        file.attrs["landscape_store"] = STORE_FORMAT_VERSION
                        file.attrs["provenance"] = json.dumps(prov, sort_keys=True)
                        file.attrs["grid_shape"] = np.asarray(grid, dtype=np.int64)
                        file.attrs["point_arrays"] = json.dumps(list(specs))
                        _create_dataset(file, DONE, grid, bool)
                        for name, (shape, dtype) in specs.items():
                            _create_dataset(file, name, grid + shape, dtype)
                if errors:
                    raise errors[0]
                os.replace(fresh, partial)
            except (OSError, RuntimeError) as err:
                fresh.unlink(missing_ok=True)
                raise StoreWriteError(f"could not create the store {partial}: {_reason(err)}. Nothing was "
                                      f"computed; make room (or raise the file-size limit) and run again") \
                    from None
            except BaseException:
                fresh.unlink(missing_ok=True)
                raise
            return cls(_open_for_writing(partial), path, grid, specs, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
               grid_shape: Sequence[int] = ()) -> ResultStore:
        """Reopen the unfinished ``<path>.partial`` for writing, after checking it was written for this run
        (same provenance except ``created``, grid and arrays); raises :class:`StoreMismatchError`
        otherwise, and :class:`StoreInProgressError` if another process writes it."""
        grid, specs = _check_schema(arrays, grid_shape)
        partial = partial_path(path)
        lock = _WriterLock.acquire(Path(path))
        try:
            _check_partial_readable(partial)
            _check_same_run(read_store(partial), provenance, grid, specs)
            return cls(_open_for_writing(partial), Path(path), grid, specs, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open_run(cls, path: str | os.PathLike, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
                 grid_shape: Sequence[int] = (), resume: bool = False) -> ResultStore:
        """Start or continue the run stored at ``path``.

        Without ``resume``: a new store (an existing ``path`` or partial file is an error). With
        ``resume``: continue ``<path>.partial`` if present; if the finished ``path`` exists, check it
        belongs to this run and open it read-only (every point done, :meth:`finish` does nothing);
        otherwise start a new store.
        """
        path = Path(path)
        if not resume:
            return cls.create(path, provenance, arrays, grid_shape)
        if partial_path(path).exists():
            return cls.resume(path, provenance, arrays, grid_shape)
        if path.exists():
            grid, specs = _check_schema(arrays, grid_shape)
            _check_same_run(read_store(path), provenance, grid, specs)
            return cls(h5py.File(path, "r"), path, grid, specs)
        return cls.create(path, provenance, arrays, grid_shape)

    # ----------------------------------------------------------------------------------- reading
    @property
    def done(self) -> np.ndarray:
        """Boolean mask (``grid_shape``) of the finished points."""
        return self._done.copy()

    @property
    def provenance(self) -> dict[str, Any]:
        return json.loads(self._file.attrs["provenance"])

    @property
    def writable(self) -> bool:
        # a file whose close failed must not be asked anything more (h5py may crash on it)
        return not self._failed and self._file.id.valid and self._file.mode == "r+"

    # ----------------------------------------------------------------------------------- writing
    def write_point(self, index: int | tuple[int, ...], values: Mapping[str, Any]) -> None:
        """Store every point array's value at grid ``index`` (flat C-order int or tuple), mark it done, flush.

        ``values`` must hold exactly the declared point arrays (no half-written points).
        """
        self._require_writable()
        idx = _grid_index(index, self.grid_shape)
        point = _checked_point(values, self._specs)
        with self._checked(f"point {idx}"):
            for name, value in point.items():
                self._datasets[name][idx] = value
            self._datasets[DONE][idx] = True
            self._seal_unchunked()
            self._file.flush()
        self._done[idx] = True
        self._report_progress()
        interrupts.check()  # a Ctrl-C swallowed by a finalizer stops the run here, with this point kept

    def write_points(self, values: Mapping[str, np.ndarray], done: np.ndarray) -> None:
        """Store whole point arrays at once for the points where ``done`` is True (e.g. merged shards),
        flush."""
        self._require_writable()
        done = np.asarray(done, dtype=bool)
        if done.shape != self.grid_shape or set(values) != set(self.point_arrays):
            raise StoreError(f"write_points needs a done mask of shape {self.grid_shape} and exactly the "
                             f"arrays {sorted(self.point_arrays)}; got {done.shape} and {sorted(values)}")
        with self._checked(f"{int(done.sum())} points"):
            for name in self.point_arrays:
                ds = self._datasets[name]
                full = ds[()]
                full[done] = np.asarray(values[name], dtype=ds.dtype)[done]
                ds[()] = full
            self._datasets[DONE][()] = self._done | done
            self._seal_unchunked()
            self._file.flush()
        self._done |= done
        self._report_progress()

    def write_array(self, name: str, array: Any) -> None:
        """Store a finished array (not point by point), e.g. grid coordinates; replaces one of the same
        name."""
        self._require_writable()
        _check_name(name, self.point_arrays)
        data = _to_hdf5(array)
        with self._checked(f"array {name!r}"):
            if name in self._file:
                del self._file[name]
            _create_dataset(self._file, name, data.shape, data.dtype, data)
            self._file.flush()

    def write_table(self, name: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """Store a small table as a group of equally long 1-D columns (numbers or strings)."""
        self._require_writable()
        _check_table(name, columns, self.point_arrays)
        with self._checked(f"table {name!r}"):
            if name in self._file:
                del self._file[name]
            group = self._file.create_group(name)
            group.attrs["table"] = True
            for col, values in columns.items():
                data = _to_hdf5(values)
                _create_dataset(group, col, data.shape, data.dtype, data)
            self._file.flush()

    # ------------------------------------------------------------------------------------ closing
    def finish(self) -> Path:
        """Close, verify and move the finished run into place (``os.replace(<path>.partial, <path>)``);
        returns ``path``.

        The closed partial file is read back whole (checksums verified) and must hold every point this
        writer marked done; otherwise it is not renamed and :class:`StoreWriteError` says what is left.
        """
        if self._failed:
            raise StoreError(f"store {self.path} failed earlier: it cannot be finished")
        if not self._file.id.valid:
            raise StoreError(f"store {self.path} is closed: reopen it with resume to finish it")
        if not self.writable:
            self._file.close()
            return self.path
        partial = partial_path(self.path)
        with self._checked("the end of the run"):
            self._datasets.clear()
            self._file.close()
        try:
            stored = read_store(partial)
            problem = (None if np.array_equal(stored.done, self._done) else
                       f"it holds {int(stored.done.sum())} finished points where {int(self._done.sum())} "
                       f"were written")
        except StoreError as err:
            problem = str(err)
        if problem:
            self._release()
            raise StoreWriteError(f"the store {partial} did not read back as written ({problem}); it was "
                                  f"not moved to {self.path.name}. {_left_on_disk(partial)}")
        os.replace(partial, self.path)
        progress_path(partial).unlink(missing_ok=True)
        self._release()
        return self.path

    def close(self) -> None:
        """Close without finishing: the partial file stays, to be resumed (its count of finished points is
        kept for :func:`interrupted_runs`)."""
        if not self._failed and self._file.id.valid:
            unfinished = self.writable and not self._failed
            done = self._done
            with _reported_h5py_errors():
                if unfinished:  # the file's own mask: a Ctrl-C can land after a point is marked done in the
                    with contextlib.suppress(OSError, RuntimeError, KeyError):  # file, before it is here
                        done = np.asarray(self._datasets[DONE][()], dtype=bool) | self._done
                with contextlib.suppress(OSError, RuntimeError):
                    self._datasets.clear()
                    self._file.close()
            if unfinished:
                _INTERRUPTED[str(partial_path(self.path))] = (int(done.sum()), done.size)
        self._release()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _checked(self, what: str) -> Iterator[None]:
        """Run one store operation; any HDF5 or OS error in it (raised, or only reported by a destructor)
        ends the run: the file is closed, the lock let go, and :class:`StoreWriteError` says what is left."""
        try:
            with _reported_h5py_errors() as errors:
                yield
            if errors:
                raise errors[0]
        except (OSError, RuntimeError, ValueError) as err:  # h5py maps some HDF5 I/O failures to ValueError
            self._fail()
            partial = partial_path(self.path)
            failed = f"writing {what} to {partial} failed: {_reason(err)}"
            error = StoreWriteError(f"{failed}. {_left_on_disk(partial)}")
            error.what = failed  # for writers that remove the partial (merge, whole records)
            raise error from None

    def _seal_unchunked(self) -> None:
        """Renew the sha256 attribute of the point arrays HDF5 cannot checksum (a single-point store's)."""
        for ds in self._datasets.values():
            if ds.chunks is None:
                seal(ds)

    def _fail(self) -> None:
        self._failed = True
        self._datasets.clear()
        with _reported_h5py_errors(), contextlib.suppress(OSError, RuntimeError):
            self._file.close()
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _report_progress(self) -> None:
        """In a sweep's job, the number of finished points to the progress file (replaced atomically)."""
        if not os.environ.get(PROGRESS_ENV) or not self.writable:
            return
        path = progress_path(partial_path(self.path))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"done": int(self._done.sum()), "points": int(np.prod(self.grid_shape)),
                                   "pid": os.getpid()}))
        os.replace(tmp, path)

    def _require_writable(self) -> None:
        if self._failed:
            raise StoreError(f"store {self.path} failed earlier: no more points can be written to it")
        if not self.writable:
            raise StoreError(f"store {self.path} is "
                             f"{'closed' if not self._file.id.valid else 'finished (read-only)'}")


# Unfinished stores closed in this process: partial path -> (finished points, points). The CLI reads it
# after Ctrl-C to say what was kept and how to resume.
_INTERRUPTED: dict[str, tuple[int, int]] = {}


def interrupted_runs() -> dict[str, tuple[int, int]]:
    """Stores this process closed unfinished: ``partial path -> (finished points, points)``."""
    return dict(_INTERRUPTED)


def _open_for_writing(partial: Path) -> h5py.File:
    try:
        return h5py.File(partial, "r+")
    except BlockingIOError:
        raise StoreInProgressError(f"{partial} is open for writing by another process (HDF5's lock): wait "
                                   f"for it to finish or stop it") from None
    except OSError as err:
        raise StoreError(f"{partial} cannot be opened for writing ({_reason(err)}). "
                         f"{_left_on_disk(partial)}") from None


def _left_on_disk(partial: Path) -> str:
    """What a failed or interrupted write left: a readable partial (resumable, with its points) or one that
    must be deleted."""
    if not partial.exists():
        return "Nothing was kept; run the command again."
    try:
        stored = read_store(partial)
    except StoreError as err:
        return (f"{partial} cannot be read back ({err}): delete it, make room (or raise the file-size "
                f"limit) and run the command again")
    return (f"{partial} is readable and keeps {int(stored.done.sum())} of {stored.done.size} finished "
            f"points: make room (or raise the file-size limit) and run the same command with --resume")


# ------------------------------------------------------------------------------------- in memory
class MemoryStore:
    """The writing interface of :class:`ResultStore`, kept in numpy arrays: for runs without a store path,
    so they build their results from the same :class:`StoreData` as stored runs."""

    writable = True

    def __init__(self, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
                 grid_shape: Sequence[int] = ()):
        self.grid_shape, self._specs = _check_schema(arrays, grid_shape)
        self.point_arrays = tuple(self._specs)
        self._arrays = {n: np.full(self.grid_shape + shape, _fill_value(dtype), dtype=dtype)
                        for n, (shape, dtype) in self._specs.items()}
        self._done = np.zeros(self.grid_shape, dtype=bool)
        self._provenance = _stamped(provenance)

    @property
    def done(self) -> np.ndarray:
        return self._done.copy()

    def write_point(self, index: int | tuple[int, ...], values: Mapping[str, Any]) -> None:
        idx = _grid_index(index, self.grid_shape)
        for name, value in _checked_point(values, self._specs).items():
            self._arrays[name][idx] = value
        self._done[idx] = True

    def write_array(self, name: str, array: Any) -> None:
        _check_name(name, self.point_arrays)
        self._arrays[name] = np.asarray(array)

    def write_table(self, name: str, columns: Mapping[str, Sequence[Any]]) -> None:
        _check_table(name, columns, self.point_arrays)
        self._arrays.update({f"{name}/{col}": np.asarray(values) for col, values in columns.items()})

    def close(self) -> None:
        """Nothing to release (the interface of :meth:`ResultStore.close`)."""

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def data(self) -> StoreData:
        """Everything written, as :func:`read_store` would return it."""
        return StoreData({n: a.copy() for n, a in self._arrays.items()}, self._done.copy(), self._provenance,
                         self.point_arrays, self.grid_shape)


def start_run(path: str | os.PathLike | None, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
              grid_shape: Sequence[int] = (), resume: bool = False) -> ResultStore | MemoryStore:
    """The store of one run: :meth:`ResultStore.open_run` at ``path``, or a :class:`MemoryStore` if ``path``
    is None.

    Use it as a context manager and call :func:`finish_run` inside: if the body raises, a file store is
    closed unfinished (resumable).
    """
    if path is None:
        return MemoryStore(provenance, arrays, grid_shape)
    return ResultStore.open_run(path, provenance, arrays, grid_shape, resume)


def finish_run(record: ResultStore | MemoryStore) -> tuple[StoreData, Path | None]:
    """Complete a run: a file store is moved into place and read back; a memory store hands over its
    contents."""
    if isinstance(record, MemoryStore):
        return record.data(), None
    path = record.finish()
    return read_store(path), path


# --------------------------------------------------------------------------------------------- helpers
def _check_schema(arrays: Mapping[str, ArraySpec], grid_shape: Sequence[int]) -> tuple[tuple[int, ...], dict]:
    grid = tuple(grid_shape)
    if any(not isinstance(n, (int, np.integer)) or n < 1 for n in grid):
        raise StoreError(f"grid_shape must be positive integers, got {grid_shape!r}")
    if not arrays:
        raise StoreError("a store needs at least one point array")
    specs = {}
    for name, spec in arrays.items():
        _check_name(name, ())
        try:
            shape, dtype = spec
            specs[name] = (tuple(int(n) for n in shape), np.dtype(dtype))
        except (TypeError, ValueError):
            raise StoreError(f"array {name!r} must be declared as (point_shape, dtype), "
                             f"got {spec!r}") from None
    return tuple(int(n) for n in grid), specs


def _stamped(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance with ``code_version`` and ``created`` (UTC, ISO 8601) added unless present,
    JSON-normalised."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return normalize_provenance({"code_version": code_version(), "created": now, **provenance})


def _grid_index(index: int | tuple[int, ...], grid_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A point's grid index from a flat C-order index or a tuple, checked against the grid."""
    n_points = int(np.prod(grid_shape))
    if isinstance(index, (int, np.integer)):
        if not 0 <= index < n_points:
            raise StoreError(f"point index {index} out of range 0..{n_points - 1}")
        return tuple(int(i) for i in np.unravel_index(int(index), grid_shape))
    index = tuple(int(i) for i in index)
    if len(index) != len(grid_shape) or any(not 0 <= i < n for i, n in zip(index, grid_shape)):
        raise StoreError(f"point index {index} does not fit the grid of shape {grid_shape}")
    return index


def _checked_point(values: Mapping[str, Any], specs: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """A point's values cast to their declared dtypes; exactly the declared arrays, each of its point
    shape."""
    missing, unknown = set(specs) - set(values), set(values) - set(specs)
    if missing or unknown:
        raise StoreError(f"a point needs exactly the arrays {sorted(specs)}; missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    checked = {}
    for name, (shape, dtype) in specs.items():
        checked[name] = np.asarray(values[name], dtype=dtype)
        if checked[name].shape != shape:
            raise StoreError(f"value of {name!r} has shape {checked[name].shape}, expected {shape}")
    return checked


def _check_table(name: str, columns: Mapping[str, Sequence[Any]], taken: Sequence[str]) -> None:
    _check_name(name, taken)
    lengths = {col: len(values) for col, values in columns.items()}
    if not columns or len(set(lengths.values())) != 1:
        raise StoreError(f"table {name!r} needs at least one column, all of equal length; "
                         f"got lengths {lengths}")


def _check_name(name: str, taken: Sequence[str]) -> None:
    if (not isinstance(name, str) or not name or name.startswith("/") or name.split("/")[0] == DONE
            or name in taken):
        raise StoreError(f"invalid or reserved array name {name!r} (not empty, no leading '/', not {DONE!r}, "
                         f"not a point array's name)")


def _check_same_run(existing: StoreData, provenance: Mapping[str, Any], grid: tuple[int, ...], specs: Mapping,
                    ignore: Sequence[str] = ("created", "merged_from")) -> None:
    """Raise :class:`StoreMismatchError` naming every difference between a stored run and the expected one."""
    expected = _flatten({"code_version": code_version(), **normalize_provenance(provenance)})
    found = _flatten(existing.provenance)
    found |= {k: v for k, v in OLDER_DEFAULTS.items() if k not in found and k in expected}
    skipped = {k for k in expected
               if k not in found and any(fnmatch.fnmatchcase(k, p) for p in UNRECORDED_BEFORE)}
    keep = lambda key: _root(key) not in ignore and key not in skipped  # noqa: E731
    missing = object()
    diffs = [f"{k}: store has {_show(found.get(k, missing))}, "
             f"this run has {_show(expected.get(k, missing))}"
             for k in sorted(set(expected) | set(found))
             if keep(k) and found.get(k, missing) != expected.get(k, missing)]
    if existing.grid_shape != grid:
        diffs.append(f"grid shape: store has {existing.grid_shape}, this run has {grid}")
    stored_specs = {n: (existing.arrays[n].shape[len(existing.grid_shape):], existing.arrays[n].dtype)
                    for n in existing.point_arrays}
    for name in sorted(set(stored_specs) | set(specs)):
        if stored_specs.get(name) != dict(specs).get(name):
            diffs.append(f"point array {name!r}: store has {_spec(stored_specs.get(name))}, this run has "
                         f"{_spec(dict(specs).get(name))}")
    if diffs:
        raise StoreMismatchError(f"the store was written for a different run ({len(diffs)} "
                                 f"difference{'s' if len(diffs) > 1 else ''}):\n  " + "\n  ".join(diffs))


def _root(key: str) -> str:
    return key.split(".")[0].split("[")[0]


def _show(value: Any) -> str:
    """A provenance value in full (never cut: the difference may be at its end)."""
    return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else \
        json.dumps(value, default=str)


def _spec(spec: Any) -> str:
    return "(absent)" if spec is None else f"point shape {tuple(spec[0])}, dtype {np.dtype(spec[1])}"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested provenance as ``a.b[2].c -> value`` leaves, so a mismatch names the one key that differs (a
    direction's ``directions[1].seed``, not the whole list)."""
    flat = {}
    for key, value in tree.items():
        flat.update(_leaves(value, f"{prefix}{key}"))
    return flat


def _leaves(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        return {k: v for sub, item in value.items() for k, v in _leaves(item, f"{key}.{sub}").items()}
    if isinstance(value, list) and value and any(isinstance(v, (Mapping, list)) for v in value):
        out = {f"{key}.length": len(value)}
        for i, item in enumerate(value):
            out.update(_leaves(item, f"{key}[{i}]"))
        return out
    return {key: value}


def normalize_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance as it reads back from a store's JSON (tuples become lists, numpy scalars numbers...)."""
    try:
        return json.loads(json.dumps(dict(provenance), sort_keys=True, default=_json_default))
    except (TypeError, ValueError) as err:
        raise StoreError(f"provenance must be JSON-serialisable: {err}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _to_hdf5(values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind in "UO":
        return np.asarray([str(v) for v in array.ravel()], dtype=h5py.string_dtype()).reshape(array.shape)
    return array


def _same_array(a: np.ndarray, b: np.ndarray | None) -> bool:
    if b is None or a.shape != b.shape or a.dtype.kind != b.dtype.kind:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
