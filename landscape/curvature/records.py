"""The reader of a whole curvature store: :func:`read_curvature` gives a :class:`CurvatureRecord`.

A curvature store is what ``landscape spectrum``, figure 6 (``analyses/fig6_curvature.py``) and the curvature
study (``analyses/curvature_study.py``) write through :func:`landscape.store.run_tasks`: root provenance of
kind ``curvature`` (model, data, ``nll_convention``, settings, the ``tasks`` in run order), and one task per
result: ``spectrum``, ``trace``, ``density`` and ``path/<label>``. Stores written before the redesign read the
same (the layout did not change).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from landscape.curvature.directional import PathCurvature
from landscape.curvature.space import CurvatureError
from landscape.curvature.spectrum import Density, Spectrum, TraceEstimate
from landscape.curvature.stored import ATTRS, has_task, store_data
from landscape.store import StoreData

PATH_PREFIX = "path/"


@dataclass(frozen=True)
class CurvatureRecord:
    """Everything a curvature store holds, each part optional.

    Attributes:
        provenance: the store's root provenance (``nll_convention``, settings, ``tasks``...).
        spectrum, trace, density: the results of the tasks of those names, or ``None`` where not measured.
        paths: label -> :class:`PathCurvature` of each ``path/<label>`` task, in run order.
    """

    provenance: Mapping[str, Any]
    spectrum: Spectrum | None = None
    trace: TraceEstimate | None = None
    density: Density | None = None
    paths: Mapping[str, PathCurvature] = field(default_factory=dict)

    def markdown(self, paths: bool = True) -> str:
        """The spectrum, trace and density at w0 (as ``landscape spectrum`` prints them), then (with
        ``paths``) a table of the curvature (and slope, with the quadratic model at w0) along each path; parts
        not measured are left out. Numbers in nats/token per squared weight unit (slopes per weight unit)."""
        parts = [self._spectrum_markdown()] if self.spectrum is not None else []
        if paths and self.paths:
            parts.append(self._paths_markdown())
        return "\n\n".join(parts)

    def _spectrum_markdown(self) -> str:
        conv, spectrum, lines = self.provenance["nll_convention"], self.spectrum, []
        lines += [f"{spectrum.operator} of the token-mean NLL ({conv['n_segments']} x {conv['seq_len']} "
                  f"held-out {conv['corpus']} tokens, {conv['n_tokens']:,} scored) over "
                  f"{spectrum.n_params:,} weights of {len(spectrum.layers)} layers; "
                  f"{spectrum.lanczos_steps} Lanczos steps, "
                  f"{spectrum.seconds_per_matvec:.2g} s per product",
                  "", "| end | eigenvalues | residuals | converged |", "|---|---|---|---|"]
        for pairs in (spectrum.top, spectrum.bottom):
            if len(pairs):
                lines.append(f"| {pairs.end} | {np.array2string(pairs.eigenvalues, precision=4)} | "
                             f"{np.array2string(pairs.residuals, precision=2)} | "
                             f"{int(pairs.converged.sum())}/{len(pairs.converged)} |")
        if self.trace is not None:
            trace = self.trace
            lines += ["", f"trace (Hutch++, {trace.n_matvecs} products): {trace.value:.5g} +- "
                          f"{trace.stderr:.2g} (standard error); mean eigenvalue {trace.mean_eigenvalue:.3g}"]
        if self.density is not None:
            grid, settings = self.density.grid, self.density.settings
            mass = float(np.trapezoid(self.density.density, grid))
            lines += ["", f"density (SLQ, {settings['n_runs']} runs x {settings['lanczos_steps']} steps): "
                          f"support [{grid[0]:.4g}, {grid[-1]:.4g}], integral {mass:.3f}"]
        return "\n".join(lines)

    def _paths_markdown(self) -> str:
        """One row per path: ``u^T H u`` with its interval at each ``t``, and where measured the slope
        ``g^T u`` and the quadratic model ``||d|| g^T u + ||d||^2 u^T H u / 2`` at ``t = 0``. The columns are
        those of the last path (paths of one store share their ``t``)."""
        rows = []
        for label, path in self.paths.items():
            t, c, lo, hi = path.t, path.curvature, path.low, path.high
            norm = path.direction_norm
            cells = [f"{c[i]:.3g} [{lo[i]:.2g}, {hi[i]:.2g}]" for i in range(len(t))]
            if path.slope is not None:
                g, glo, ghi = path.slope, path.slope_low, path.slope_high
                cells += [f"{g[i]:.3g} [{glo[i]:.2g}, {ghi[i]:.2g}]" for i in range(len(t))]
                start = int(np.argmin(np.abs(t)))  # the quadratic model at w0 (t = 0), if measured there
                cells.append(f"{norm * g[start] + norm ** 2 * c[start] / 2:+.3g}" if t[start] == 0 else "")
            rows.append(f"| {label} | {norm:.1f} | " + " | ".join(cells) + " |")
        last = list(self.paths.values())[-1]
        head = [f"u^T H u at t = {x:g} [95 % over segments]" for x in last.t]
        if last.slope is not None:
            head += [f"g^T u at t = {x:g}" for x in last.t]
            head += ["‖d‖ g^T u + ‖d‖² u^T H u / 2 at t = 0 (nats)"]
        header = ["| direction | ‖d‖ | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
        return "\n".join([*header, *rows])


def read_curvature(source: str | os.PathLike | StoreData) -> CurvatureRecord:
    """Every result of a curvature store (a path, or contents from :func:`landscape.store.read_store`).

    Raises:
        CurvatureError: the store holds another kind of run, or a task of the wrong kind.
        StoreError: the file is missing, unreadable or unfinished (:func:`landscape.store.read_store`).
    """
    data = store_data(source)
    provenance = data.provenance
    if provenance.get("kind") != "curvature":
        raise CurvatureError(f"the store holds a {provenance.get('kind')!r} run, not a curvature run")
    return CurvatureRecord(
        provenance,
        Spectrum.from_data(data) if has_task(data, "spectrum") else None,
        TraceEstimate.from_data(data) if has_task(data, "trace") else None,
        Density.from_data(data) if has_task(data, "density") else None,
        {task[len(PATH_PREFIX):]: PathCurvature.from_data(data, task) for task in _path_tasks(data)})


def _path_tasks(data: StoreData) -> list[str]:
    """The finished ``path/<label>`` tasks, in the order of the provenance's ``tasks`` (else of the
    arrays)."""
    suffix = f"/{ATTRS}"
    stored = [name[: -len(suffix)] for name in data.arrays if name.endswith(suffix)]
    tasks = data.provenance.get("tasks") or stored
    return [task for task in tasks if task.startswith(PATH_PREFIX) and has_task(data, task)]
