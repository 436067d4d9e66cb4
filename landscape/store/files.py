"""The store files: paths, the writer of one run (a file, or memory), the reader, and the checks of both.

See :mod:`landscape.store` for the layout and the guarantees.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from landscape.outputs import check_output_path
from landscape.version import __version__

STORE_FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
# Set in a job of a fanned-out sweep (landscape.cluster): the writer keeps a small JSON file beside each
# partial store with its number of finished points, for the driver (HDF5 locks the store while written).
PROGRESS_ENV = "LANDSCAPE_REPORT_PROGRESS"
DONE = "done"
# Provenance keys that describe how a run was executed, not what it computed: two runs that differ only
# in these hold the same results (a resumed run keeps its store's keys; merging drops "shard").
RUN_SPECIFIC_KEYS: tuple[str, ...] = ("created", "shard", "merged_from")

# What stores written before these keys existed computed in: a missing key there means this value.
OLDER_DEFAULTS: dict[str, Any] = {"model_info.device": "cpu", "device": "cpu", "dtype": "float32"}

ArraySpec = tuple[tuple[int, ...], Any]  # (point shape, numpy dtype-like)


class StoreError(ValueError):
    """A store that cannot be used: unreadable, truncated, not a landscape store, or a forbidden write."""


class StoreMismatchError(StoreError):
    """An existing store was written for a different run (another model, data set, grid, directions...)."""


class StoreInProgressError(StoreError):
    """A store whose run has not finished: its writer is still running (the file is locked), or the run
    stopped early and only its ``.partial`` file exists (resume it)."""


def check_store_path(path: str | os.PathLike, resume: bool = False) -> Path:
    """Raise before any work unless a run can write its store at ``path``: a writable location
    (:func:`~landscape.outputs.check_output_path`) and, without ``resume``, neither ``path`` nor its
    partial file already there. Returns ``path`` as a :class:`Path`."""
    path = check_output_path(path)
    if not resume:
        for existing in (path, partial_path(path)):
            if existing.exists():
                raise StoreError(f"{existing} already exists: resume it, or remove it to start over")
    return path


def partial_path(path: str | os.PathLike) -> Path:
    """Where a store lives while its run is unfinished: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


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
    """

    def __init__(self, file: h5py.File, path: Path, grid_shape: tuple[int, ...],
                 specs: Mapping[str, ArraySpec]):
        self._file = file
        self.path = path  # the final path
        self.grid_shape = grid_shape
        self._specs = dict(specs)
        self.point_arrays = tuple(specs)
        self._report_progress()

    # ---------------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
               grid_shape: Sequence[int] = ()) -> ResultStore:
        """Start a new store at ``<path>.partial`` (refused if ``path`` or the partial file exists).

        Args:
            provenance: JSON-serialisable description of the run; ``code_version`` and ``created``
                (UTC, ISO 8601) are added unless present.
            arrays: point array name -> ``(point_shape, dtype)``; stored with shape
                ``grid_shape + point_shape``.
            grid_shape: shape of the grid of points (``()`` for a store with a single point).

        Raises:
            OutputPathError: ``path`` cannot be written; StoreError: it (or its partial file) exists already.
        """
        path, partial = Path(path), partial_path(path)
        grid, specs = _check_schema(arrays, grid_shape)
        prov = _stamped(provenance)
        check_store_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The empty store is written under a temporary name and renamed: a run killed while creating it leaves
        # no .partial that cannot be read (a new HDF5 file is unreadable until it is first flushed).
        fresh = partial.with_name(partial.name + ".new")
        try:
            with h5py.File(fresh, "w") as file:
                file.attrs["landscape_store"] = STORE_FORMAT_VERSION
                file.attrs["provenance"] = json.dumps(prov, sort_keys=True)
                file.attrs["grid_shape"] = np.asarray(grid, dtype=np.int64)
                file.attrs["point_arrays"] = json.dumps(list(specs))
                file.create_dataset(DONE, shape=grid, dtype=bool, fillvalue=False)
                for name, (shape, dtype) in specs.items():
                    file.create_dataset(name, shape=grid + shape, dtype=dtype, fillvalue=_fill_value(dtype))
            os.replace(fresh, partial)
        except BaseException:
            fresh.unlink(missing_ok=True)
            raise
        return cls(h5py.File(partial, "r+"), path, grid, specs)

    @classmethod
    def resume(cls, path: str | os.PathLike, provenance: Mapping[str, Any], arrays: Mapping[str, ArraySpec],
               grid_shape: Sequence[int] = ()) -> ResultStore:
        """Reopen the unfinished ``<path>.partial`` for writing, after checking it was written for this run
        (same provenance except ``created``, grid and arrays); raises :class:`StoreMismatchError`
        otherwise."""
        grid, specs = _check_schema(arrays, grid_shape)
        partial = partial_path(path)
        _check_same_run(read_store(partial), provenance, grid, specs)
        return cls(h5py.File(partial, "r+"), Path(path), grid, specs)

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
        return self._file[DONE][()]

    @property
    def provenance(self) -> dict[str, Any]:
        return json.loads(self._file.attrs["provenance"])

    @property
    def writable(self) -> bool:
        return self._file.mode == "r+"

    # ----------------------------------------------------------------------------------- writing
    def write_point(self, index: int | tuple[int, ...], values: Mapping[str, Any]) -> None:
        """Store every point array's value at grid ``index`` (flat C-order int or tuple), mark it done, flush.

        ``values`` must hold exactly the declared point arrays (no half-written points).
        """
        self._require_writable()
        idx = _grid_index(index, self.grid_shape)
        for name, value in _checked_point(values, self._specs).items():
            self._file[name][idx] = value
        self._file[DONE][idx] = True
        self._file.flush()
        self._report_progress()

    def write_points(self, values: Mapping[str, np.ndarray], done: np.ndarray) -> None:
        """Store whole point arrays at once for the points where ``done`` is True (e.g. merged shards),
        flush."""
        self._require_writable()
        done = np.asarray(done, dtype=bool)
        if done.shape != self.grid_shape or set(values) != set(self.point_arrays):
            raise StoreError(f"write_points needs a done mask of shape {self.grid_shape} and exactly the "
                             f"arrays {sorted(self.point_arrays)}; got {done.shape} and {sorted(values)}")
        for name in self.point_arrays:
            ds = self._file[name]
            full = ds[()]
            full[done] = np.asarray(values[name], dtype=ds.dtype)[done]
            ds[()] = full
        self._file[DONE][()] = self.done | done
        self._file.flush()
        self._report_progress()

    def write_array(self, name: str, array: Any) -> None:
        """Store a finished array (not point by point), e.g. grid coordinates; replaces one of the same
        name."""
        self._require_writable()
        _check_name(name, self.point_arrays)
        if name in self._file:
            del self._file[name]
        self._file.create_dataset(name, data=_to_hdf5(array))
        self._file.flush()

    def write_table(self, name: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """Store a small table as a group of equally long 1-D columns (numbers or strings)."""
        self._require_writable()
        _check_table(name, columns, self.point_arrays)
        if name in self._file:
            del self._file[name]
        group = self._file.create_group(name)
        group.attrs["table"] = True
        for col, values in columns.items():
            group.create_dataset(col, data=_to_hdf5(values))
        self._file.flush()

    # ------------------------------------------------------------------------------------ closing
    def finish(self) -> Path:
        """Close and move the finished run into place (``os.replace(<path>.partial, <path>)``); returns
        ``path``."""
        if not self._file.id.valid:
            raise StoreError(f"store {self.path} is closed: reopen it with resume to finish it")
        writable = self.writable
        self._file.close()
        if writable:
            os.replace(partial_path(self.path), self.path)
            progress_path(partial_path(self.path)).unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        """Close without finishing: the partial file stays, to be resumed."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _report_progress(self) -> None:
        """In a sweep's job, the number of finished points to the progress file (replaced atomically)."""
        if not os.environ.get(PROGRESS_ENV) or not self.writable:
            return
        path = progress_path(partial_path(self.path))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"done": int(self.done.sum()), "points": int(np.prod(self.grid_shape)),
                                   "pid": os.getpid()}))
        os.replace(tmp, path)

    def _require_writable(self) -> None:
        if not self._file.id.valid or not self.writable:
            raise StoreError(f"store {self.path} is "
                             f"{'closed' if not self._file.id.valid else 'finished (read-only)'}")


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
        if file.attrs.get("landscape_store") != STORE_FORMAT_VERSION or DONE not in file:
            raise StoreError(f"{path} is not a landscape result store of format version "
                             f"{STORE_FORMAT_VERSION} (found version {file.attrs.get('landscape_store')!r})")
        try:
            provenance = json.loads(file.attrs["provenance"])
            grid = tuple(int(n) for n in file.attrs["grid_shape"])
            point_arrays = tuple(json.loads(file.attrs["point_arrays"]))  # in declaration order
            arrays: dict[str, np.ndarray] = {}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset) and name != DONE:
                    arrays[name] = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]

            file.visititems(visit)
            arrays = {**{n: arrays[n] for n in point_arrays}, **arrays}
            done = file[DONE][()]
        except (OSError, KeyError, ValueError) as err:
            raise StoreError(f"{path} is damaged: {err}") from None
    if done.shape != grid:
        raise StoreError(f"{path} is damaged: done mask shape {done.shape} differs from grid shape {grid}")
    return StoreData(arrays, done, provenance, point_arrays, grid)


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
                    ignore: Sequence[str] = ("created",)) -> None:
    """Raise :class:`StoreMismatchError` naming every difference between a stored run and the expected one."""
    expected = _flatten({"code_version": code_version(), **normalize_provenance(provenance)})
    found = _flatten(existing.provenance)
    found |= {k: v for k, v in OLDER_DEFAULTS.items() if k not in found and k in expected}
    keep = lambda key: key.split(".")[0] not in ignore  # noqa: E731
    diffs = [f"{k}: store has {_short(found.get(k))}, this run has {_short(expected.get(k))}"
             for k in sorted(set(expected) | set(found)) if keep(k) and found.get(k) != expected.get(k)]
    if existing.grid_shape != grid:
        diffs.append(f"grid shape: store has {existing.grid_shape}, this run has {grid}")
    stored_specs = {n: (existing.arrays[n].shape[len(existing.grid_shape):], existing.arrays[n].dtype)
                    for n in existing.point_arrays}
    if stored_specs != dict(specs):
        diffs.append(f"point arrays: store has {_short(sorted(stored_specs))}, "
                     f"this run has {_short(sorted(specs))}")
    if diffs:
        raise StoreMismatchError("the store was written for a different run: " + "; ".join(diffs))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


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


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if dtype.kind in "fc" else (False if dtype.kind == "b" else 0)


def _to_hdf5(values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind in "UO":
        return np.asarray([str(v) for v in array.ravel()], dtype=h5py.string_dtype()).reshape(array.shape)
    return array


def _same_array(a: np.ndarray, b: np.ndarray | None) -> bool:
    if b is None or a.shape != b.shape or a.dtype.kind != b.dtype.kind:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
