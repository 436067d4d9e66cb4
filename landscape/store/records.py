"""Whole results in stores: the provenance every store starts from, the one serialised form of a finished
result (:class:`StoreRecord`) and its writer, task stores (one point per task), and merging the shards of one
run."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from landscape.data import TokenSet
from landscape.memory import release_freed_memory
from landscape.objectives import NLLConvention
from landscape.store.files import (
    RUN_SPECIFIC_KEYS,
    MemoryStore,
    ResultStore,
    StoreData,
    StoreError,
    StoreMismatchError,
    StoreWriteError,
    _check_same_run,
    _same_array,
    finish_run,
    normalize_provenance,
    partial_path,
    read_store,
    start_run,
)
from landscape.weights import Base


def model_provenance(base: Base) -> dict[str, Any]:
    """What every store records of its model: its name, the fingerprint of w0 over every quantizable layer,
    the dtype and device it computed in, and torch's CPU thread count (which sets the order of the
    reductions, so the last bits of an NLL: measured up to 2e-17 apart between 1 and 2 threads). A resume
    in another dtype, on another device or with another thread count is refused."""
    return {"model": base.label, "model_fingerprint": base.fingerprint(),
            "dtype": str(base.dtype).removeprefix("torch."), "device": str(base.device),
            "torch_threads": torch.get_num_threads()}


def provenance(kind: str, base: Base | None = None, data: TokenSet | None = None,
               **extra: Any) -> dict[str, Any]:
    """The provenance a store starts from: what it holds (``kind``), the model (:func:`model_provenance`), the
    data with the convention of its NLLs, then ``extra`` (which may override them)."""
    out: dict[str, Any] = {"kind": kind}
    if base is not None:
        out |= model_provenance(base)
    if data is not None:
        label = base.label if base is not None else ""
        out |= {"data": data.provenance(), "nll_convention": NLLConvention.for_data(data, label).to_dict()}
    return {**out, **extra}




@dataclass(frozen=True)
class StoreRecord:
    """What a finished result writes to a store: the one form every result type serialises to (``to_record``).

    Attributes:
        provenance: JSON-able description (``kind`` says what the store holds).
        rows: per-row arrays ``(n_rows, ...)``, stored as the store's points (one point per row); may be empty
            for a task of :func:`run_tasks`.
        arrays: whole arrays (matrices, coordinates, scalars).
        tables: small tables, name -> columns of equal length.
    """

    provenance: Mapping[str, Any]
    rows: Mapping[str, np.ndarray] = field(default_factory=dict)
    arrays: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, Mapping[str, Sequence[Any]]] = field(default_factory=dict)


def write_record(path: str | os.PathLike, record: StoreRecord) -> Path:
    """Write a :class:`StoreRecord` to a new store at ``path`` through :func:`start_run` (written as
    ``<path>.partial``, then moved into place, so a reader never sees half of it). Refused if ``path``
    exists."""
    rows = {name: np.asarray(values) for name, values in record.rows.items()}
    counts = {len(v) for v in rows.values()}
    if len(counts) != 1 or 0 in counts:
        raise StoreError(f"a record needs row arrays of one common, nonzero length; got lengths "
                         f"{ {k: len(v) for k, v in rows.items()} }")
    n = counts.pop()
    store = start_run(path, record.provenance, {k: (v.shape[1:], v.dtype) for k, v in rows.items()}, (n,))
    try:
        store.write_points(rows, np.ones(n, dtype=bool))
        _write_whole(store, record)
        return store.finish()
    except BaseException as err:
        _discard(store, path, err)


def _discard(store: ResultStore | MemoryStore, path: str | os.PathLike, err: BaseException) -> NoReturn:
    """A store written at once (a record, a merge) that failed: nothing of it is kept; re-raise ``err`` (a
    write failure says so, not "resume it": these writers have nothing to resume)."""
    store.close()
    partial_path(path).unlink(missing_ok=True)
    if isinstance(err, StoreWriteError):
        raise StoreWriteError(f"{getattr(err, 'what', err)}. Nothing was kept: make room (or raise the "
                              f"file-size limit) and run it again") from None
    raise err


def _write_whole(store: ResultStore | MemoryStore, record: StoreRecord, prefix: str = "") -> None:
    """A record's arrays and tables (not its rows), their names under ``prefix``."""
    for name, array in record.arrays.items():
        store.write_array(prefix + name, array)
    for name, columns in record.tables.items():
        store.write_table(prefix + name, columns)


def with_shard(provenance: Mapping[str, Any], shard: tuple[int, int]) -> dict[str, Any]:
    """``provenance`` plus the shard ``(i, n)`` a run computes, recorded only for a real shard (``n > 1``): a
    single-process run's provenance is unchanged (older stores still resume), and :func:`merge_stores`
    drops it."""
    index, count = shard
    return {**provenance, "shard": {"index": index, "count": count}} if count > 1 else dict(provenance)


def run_tasks(path: str | os.PathLike | None, provenance: Mapping[str, Any],
              tasks: Mapping[str, Callable[[], StoreRecord]],
              shard: tuple[int, int] = (0, 1)) -> tuple[StoreData, Path | None]:
    """Run named tasks into one resumable store: one point per task, a killed run resumes at the next task.

    Each task returns a :class:`StoreRecord` without rows (e.g. a curvature result's ``to_record()``); its
    arrays and tables are stored as ``<task>/<name>`` and its provenance as ``<task>/attrs`` (JSON), and the
    point array ``seconds`` holds each task's wall time. ``provenance`` should name the tasks (a rerun with
    other tasks is refused as another run). With ``shard=(i, n)`` only tasks ``i, i + n, ...`` run (their
    stores join with :func:`merge_stores`).
    """
    names = list(tasks)
    index, count = shard
    with start_run(path, with_shard(provenance, shard), {"seconds": ((), np.float64)}, (len(names),),
                   resume=True) as record:
        for i, name in enumerate(names):
            if record.done[i] or i % count != index:
                continue
            release_freed_memory()  # the last task's freed tensors: each task's peak is its own
            started = time.perf_counter()
            result = tasks[name]()
            if result.rows:
                raise StoreError(f"task {name!r} returned rows {sorted(result.rows)}: "
                                 f"a task stores arrays and tables")
            _write_whole(record, result, f"{name}/")
            record.write_array(f"{name}/attrs",
                               json.dumps(normalize_provenance(result.provenance), sort_keys=True))
            record.write_point(i, {"seconds": time.perf_counter() - started})
        return finish_run(record)




# --------------------------------------------------------------------------------------------- merging
def merge_stores(out: str | os.PathLike, shards: Iterable[str | os.PathLike]) -> Path:
    """Merge stores of the same run (e.g. shards ``i/n`` of one sweep) into a new store at ``out``.

    The shards must agree on everything but :data:`RUN_SPECIFIC_KEYS` of their provenance, on the grid and
    the arrays; a point done in several shards must hold bit-identical values there; finished arrays and
    tables that several shards hold must be identical (one that a single shard holds, such as a task's
    result in :func:`run_tasks`, is taken from it). The merged provenance drops ``shard`` and lists
    ``merged_from``.

    Returns:
        ``out`` when the stores hold every point between them; otherwise the unfinished ``<out>.partial``,
        which the run's own command with ``--resume`` (and ``--out out``, without ``--shard``) completes.

    Raises:
        StoreError / StoreMismatchError: before anything is written.
    """
    paths = [Path(p) for p in shards]
    if not paths:
        raise StoreError("merge needs at least one store")
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise StoreError(f"{p} is given twice (as {seen[p.resolve()]} and {p}): give each store once")
        seen[p.resolve()] = p
    if Path(out).resolve() in seen:
        raise StoreError(f"the merged store {out} is one of the stores to merge: choose a new path")
    data = [read_store(p) for p in paths]
    shards: dict[tuple[int, int], Path] = {}
    for path, d in zip(paths, data):  # a copy of one shard is not another shard
        shard = d.provenance.get("shard")
        if isinstance(shard, dict) and shard.get("count", 1) > 1:
            key = (shard.get("index"), shard.get("count"))
            if key in shards:
                raise StoreError(f"{path} and {shards[key]} are both shard {key[0]}/{key[1]} of the run: a "
                                 f"copy of one shard, not two shards; give each shard once")
            shards[key] = path
    first = data[0]
    specs = {n: (first.arrays[n].shape[len(first.grid_shape):], first.arrays[n].dtype)
             for n in first.point_arrays}
    values = {n: first.arrays[n].copy() for n in first.point_arrays}
    whole = {n: a for n, a in first.arrays.items() if n not in first.point_arrays}
    done = first.done.copy()
    for path, other in zip(paths[1:], data[1:]):
        try:
            _check_same_run(other, first.provenance, first.grid_shape, specs, ignore=RUN_SPECIFIC_KEYS)
        except StoreMismatchError as err:
            raise StoreMismatchError(f"cannot merge {path} with {paths[0]}: {err}") from None
        for name in other.arrays:
            if name in other.point_arrays:
                continue
            if name not in whole:  # e.g. the arrays of a task that only this shard ran (run_tasks)
                whole[name] = other.arrays[name]
            elif not _same_array(other.arrays[name], whole[name]):
                raise StoreMismatchError(f"cannot merge {path}: its array {name!r} differs from that of "
                                         f"another store")
        both = done & other.done
        for name in first.point_arrays:
            if not np.array_equal(values[name][both], other.arrays[name][both], equal_nan=True):
                raise StoreMismatchError(f"cannot merge {path}: "
                                         f"points done in several stores differ in {name!r}")
            values[name][other.done] = other.arrays[name][other.done]
        done |= other.done
    provenance = {k: v for k, v in first.provenance.items() if k not in RUN_SPECIFIC_KEYS}
    provenance["merged_from"] = [{"file": p.name, "shard": d.provenance.get("shard")}
                                 for p, d in zip(paths, data)]
    store = start_run(out, provenance, specs, first.grid_shape)
    try:
        store.write_points(values, done)
        for name, array in whole.items():
            store.write_array(name, array)
        if done.all():
            return store.finish()
        store.close()  # not every point: an unfinished store, which the run's --resume completes
        return partial_path(out)
    except BaseException as err:
        _discard(store, out, err)
