"""How a sweep runs: where its points go, whether it resumes, which shard of the points it evaluates.

A sweep (the points of a scan, the directions of a basin-radius search) is embarrassingly parallel: every
point is a pure function of (model, direction specs, coordinates, data). :class:`Execution` says how one
process runs its part of it: the HDF5 store its points are flushed to as they finish (:mod:`landscape.store`),
whether an unfinished store is resumed, and which shard ``i`` of ``n`` it evaluates (the points
``i, i + n, i + 2n, ...`` in C order), so ``n`` processes write ``n`` stores that
:func:`landscape.store.merge_stores` joins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from landscape.store import check_store_path

POINT_ORDER = "C order over the grid; shard i of n evaluates points i, i+n, ..."


class ExecutionError(ValueError):
    """Execution settings that cannot run: a bad shard, or a resume without a store."""


@dataclass(frozen=True)
class Execution:
    """How one process runs (its part of) a sweep.

    Attributes:
        store: HDF5 store path: every point is flushed as it finishes and the file moves into place when the
            run (or its shard) completes; ``None`` keeps the points in memory.
        resume: continue an unfinished store at ``store`` (skipping finished points), or read a finished one.
        shard: ``(i, n)``: evaluate only the points ``i, i + n, ...`` of the C-ordered points.
        provenance: extra JSON entries for the store (e.g. the model's :class:`~landscape.models.ModelInfo`).
        progress: show a progress bar over the points.
        low_memory: directions regenerated from specs are streamed (a layer computed when it is applied, the
            point held layer by layer): about one model of memory instead of one per direction plus w0, for
            more time per point (each forward call recomputes every layer of its direction).
    """

    store: str | Path | None = None
    resume: bool = False
    shard: tuple[int, int] = (0, 1)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True
    low_memory: bool = False

    def __post_init__(self) -> None:
        try:
            index, count = (int(x) for x in self.shard)
        except (TypeError, ValueError):
            raise ExecutionError(f"shard must be a pair (i, n), got {self.shard!r}") from None
        if not (count >= 1 and 0 <= index < count):
            raise ExecutionError(f"shard must be (i, n) with n >= 1 and 0 <= i < n, got {self.shard!r}")
        object.__setattr__(self, "shard", (index, count))
        if self.resume and self.store is None:
            raise ExecutionError("resume=True needs a store path to resume from")

    def check_store(self) -> None:
        """Raise before any work unless the store can be written (or resumed): see
        :func:`check_store_path`."""
        if self.store is not None:
            check_store_path(self.store, self.resume)

    def shard_provenance(self) -> dict[str, int]:
        return {"index": self.shard[0], "count": self.shard[1]}

    def mine(self, grid_shape: tuple[int, ...]) -> np.ndarray:
        """Boolean mask (``grid_shape``) of the points this shard evaluates."""
        mask = np.zeros(grid_shape, dtype=bool)
        mask.flat[self.shard[0]::self.shard[1]] = True
        return mask

    def progress_bar(self, items: Iterable, description: str):
        """``items`` wrapped in a progress bar (none without ``progress``)."""
        return progress_bar(items, self.progress, description)


def progress_bar(items: Iterable, enabled: bool, description: str):
    """``items`` wrapped in a tqdm bar (``enabled=False``: no bar)."""
    return tqdm(items, desc=description, disable=not enabled, leave=False)
