"""The misalignment of local and global objectives: does a lower summed layer MSE mean a lower NLL?

Given measured candidates (:mod:`landscape.studies.candidates`: RTN, GPTQ, QAFT checkpoints and random on-grid
roundings, each with its displacement norm ``||w_q - w0||``, summed layer output MSE and token-mean NLL),
:func:`misalignment` gives the Spearman rank correlation between summed MSE and NLL, with a bootstrap interval
over candidates,

* over all candidates,
* **inside** the basin (``||w_q - w0|| <= R(w0)``) and **outside** it (``> R(w0)``), and
* in bins of displacement norm, and
* **within each format** (candidates on one grid, at similar distances), with the mean of those
  correlations over the formats inside and outside R,

so the paper's finding reads directly: inside the basin the two objectives agree (correlation near 1),
outside they do not. The within-format view matters when the candidates span several bit-widths: pooled
over formats, the bit-width orders both MSE and NLL and can hide that, on one grid, the candidate with the
lower MSE is not the one with the lower NLL.

A study is stored with its candidates (a store of kind ``misalignment``, the layout of
:func:`~landscape.studies.candidates.measure_candidates`) plus its correlation tables.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from landscape.stats import (
    DEFAULT_RESAMPLES,
    MIN_PAIRS,
    Interval,
    check_interval_settings,
    pearson_rows,
    rank_correlation,
)
from landscape.store import StoreRecord, read_store, write_record
from landscape.studies.candidates import KIND, CandidateTable, MisalignmentError


# --------------------------------------------------------------------------------- misalignment
@dataclass(frozen=True)
class GroupCorrelation:
    """Rank correlation of summed layer MSE and NLL over the candidates with ``lower < ||d|| <= upper``.

    ``correlation`` is ``None`` when the group has fewer than 3 candidates or a constant variable.
    """

    name: str
    lower: float
    upper: float
    n: int
    correlation: Interval | None

    def describe(self) -> str:
        return _describe(self.correlation)


def _describe(correlation: Interval | None) -> str:
    """``+0.817 [+0.619, +0.940]``, or ``n/a`` for an undefined correlation."""
    if correlation is None:
        return "n/a"
    return f"{correlation.value:+.3f} [{correlation.low:+.3f}, {correlation.high:+.3f}]"


def _interval_columns(correlations: Sequence[Interval | None]) -> dict[str, list[float]]:
    """The ``rho``, ``low`` and ``high`` store columns of optional correlations (NaN where undefined)."""
    return {"rho": [c.value if c else math.nan for c in correlations],
            "low": [c.low if c else math.nan for c in correlations],
            "high": [c.high if c else math.nan for c in correlations]}


def _interval_from_columns(t: Mapping[str, np.ndarray], i: int, n: int, settings: Mapping[str, Any],
                           method: str, unit: str) -> Interval | None:
    """Row ``i`` of :func:`_interval_columns`'s columns back as an :class:`Interval` (``None`` where NaN)."""
    if math.isnan(t["rho"][i]):
        return None
    return Interval(float(t["rho"][i]), float(t["low"][i]), float(t["high"][i]), settings["level"], method,
                    settings["n_resamples"], int(n), unit)


@dataclass(frozen=True)
class FormatCorrelation:
    """Rank correlation of summed layer MSE and NLL among the candidates of one format (one grid).

    Attributes:
        format: the format's name.
        n: candidates of that format.
        median_norm: median displacement norm of those candidates (weight units).
        inside: whether ``median_norm <= R(w0)`` (the format counts as inside the basin).
        correlation: Spearman with its bootstrap interval over the format's candidates; ``None`` with fewer
            than 3 candidates or a constant variable.
    """

    format: str
    n: int
    median_norm: float
    inside: bool
    correlation: Interval | None


@dataclass(frozen=True)
class WithinFormat:
    """Spearman(summed layer MSE, NLL) within each format and its mean over the formats inside and outside R.

    The mean over a side is over the formats whose correlation is defined (at least 3 candidates, neither
    variable constant); its interval is a stratified bootstrap: each resample redraws every format's
    candidates with replacement (formats in ``per_format`` order, one generator seeded by ``seed`` per side),
    recomputes each format's correlation and averages them; resamples in which a format's correlation is
    undefined are dropped.

    Attributes:
        per_format: one :class:`FormatCorrelation` per format, by increasing median displacement norm.
        inside, outside: the mean over the defined formats of each side (``None`` if it has none).
    """

    per_format: tuple[FormatCorrelation, ...]
    inside: Interval | None
    outside: Interval | None

    def side_formats(self, inside: bool) -> tuple[FormatCorrelation, ...]:
        """The formats of one side whose correlation is defined (those the side's mean is over)."""
        return tuple(f for f in self.per_format if f.inside == inside and f.correlation is not None)


def within_format_correlation(candidates: CandidateTable, basin_radius: float, *, level: float = 0.95,
                              n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> WithinFormat:
    """Spearman(summed layer MSE, NLL) among the candidates of each format, and its mean over the formats
    inside (median ``||d|| <= basin_radius``) and outside R, with stratified bootstrap intervals (see
    :class:`WithinFormat`).
    """
    x_all, y_all, norms = candidates.layer_mse_sum, candidates.nll, candidates.displacement_norm
    formats = np.asarray(candidates.formats, dtype=object)
    groups = {f: np.flatnonzero(formats == f) for f in dict.fromkeys(candidates.formats)}
    order = sorted(groups, key=lambda f: (float(np.median(norms[groups[f]])), f))
    per_format, members = [], {}
    for f in order:
        index = groups[f]
        x, y = x_all[index], y_all[index]
        defined = len(index) >= MIN_PAIRS and np.ptp(x) > 0 and np.ptp(y) > 0
        corr = rank_correlation(x, y, level=level, n_resamples=n_resamples, seed=seed) if defined else None
        median = float(np.median(norms[index]))
        per_format.append(FormatCorrelation(str(f), len(index), median, median <= basin_radius, corr))
        if defined:
            members[str(f)] = index

    def side(inside: bool) -> Interval | None:
        chosen = [g for g in per_format if g.inside == inside and g.correlation is not None]
        if not chosen:
            return None
        rng = np.random.default_rng(seed)
        boot = np.zeros(n_resamples)
        for g in chosen:
            index = members[g.format]
            draw = index[rng.integers(0, len(index), size=(n_resamples, len(index)))]
            boot += pearson_rows(scipy_stats.rankdata(x_all[draw], axis=1),
                                 scipy_stats.rankdata(y_all[draw], axis=1))
        boot = boot[np.isfinite(boot)] / len(chosen)
        low, high = (np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot.size
                     else (math.nan, math.nan))
        value = float(np.mean([g.correlation.value for g in chosen]))
        return Interval(value, float(low), float(high), level, "stratified bootstrap", n_resamples,
                        sum(g.n for g in chosen), "candidates within formats")

    return WithinFormat(tuple(per_format), side(True), side(False))


@dataclass(frozen=True)
class Misalignment:
    """Rank correlation between summed layer MSE and NLL over candidates, overall, inside and outside the
    basin radius, and per displacement-norm bin.

    Attributes:
        candidates: the measured candidates.
        basin_radius: R(w0) in the units of ``||w_q - w0||`` (e.g. the median of
            :func:`landscape.engine.basin.basin_statistics` over the same layers).
        overall, inside, outside: :class:`GroupCorrelation` of all candidates, of those with
            ``||d|| <= R`` and of those with ``||d|| > R``.
        bins: one :class:`GroupCorrelation` per displacement-norm bin (first bin includes its lower edge).
        settings: level, resamples, seed, bin edges.
        within_format: :class:`WithinFormat` (correlations among the candidates of each format; ``None`` in
            stores written before it existed).
    """

    candidates: CandidateTable
    basin_radius: float
    overall: GroupCorrelation
    inside: GroupCorrelation
    outside: GroupCorrelation
    bins: tuple[GroupCorrelation, ...]
    settings: Mapping[str, Any]
    within_format: WithinFormat | None = None

    def markdown(self, include_candidates: bool = True) -> str:
        """The correlations as Markdown tables, then (``include_candidates``) every candidate's row."""
        c = self.candidates
        level = self.settings["level"]
        lines = [f"# Misalignment of summed layer MSE and NLL ({c.provenance.get('model', '?')})",
                 (f"{len(c)} candidates; NLL(w0) = {c.nll_w0:.4f} nats/token; "
                  f"R(w0) = {self.basin_radius:.4g}; "
                  f"Spearman rho with {level:.0%} bootstrap interval over candidates."), "",
                 "| group | ‖d‖ range | n | Spearman(MSE sum, NLL) |", "|---|---|---|---|"]
        for g in (self.overall, self.inside, self.outside, *self.bins):
            lines.append(f"| {g.name} | ({g.lower:.4g}, {g.upper:.4g}] | {g.n} | {g.describe()} |")
        if self.within_format is not None:
            lines += ["", *self._within_format_markdown()]
        return "\n".join(lines + (["", c.markdown()] if include_candidates else []))

    def _within_format_markdown(self) -> list[str]:
        w = self.within_format
        lines = ["Within each format (one grid; candidates at similar distances):", "",
                 "| format | median ‖d‖ | side of R | n | Spearman(MSE sum, NLL) |", "|---|---|---|---|---|"]
        lines += [f"| {f.format} | {f.median_norm:.4g} | {'inside' if f.inside else 'outside'} | {f.n} | "
                  f"{_describe(f.correlation)} |" for f in w.per_format]
        for name, inside, corr in (("inside R", True, w.inside), ("outside R", False, w.outside)):
            formats = ", ".join(f.format for f in w.side_formats(inside)) or "none"
            lines.append(f"| mean {name} ({formats}) | | | {sum(f.n for f in w.side_formats(inside))} | "
                         f"{_describe(corr)} |")
        return lines

    def to_record(self) -> StoreRecord:
        """The candidates (one point each, as :func:`~landscape.studies.candidates.measure_candidates` stores
        them, with an inside-the-basin flag), the group correlations and the within-format ones as tables."""
        c = self.candidates
        groups = (self.overall, self.inside, self.outside, *self.bins)
        rows = {**c.rows(), "inside_basin": c.displacement_norm <= self.basin_radius}
        tables = {"candidates": c.table(),
                  "correlations": {"group": [g.name for g in groups], "lower": [g.lower for g in groups],
                                   "upper": [g.upper for g in groups], "n": [g.n for g in groups],
                                   **_interval_columns([g.correlation for g in groups])}}
        arrays = {"basin_radius": np.float64(self.basin_radius), "nll_w0": np.float64(c.nll_w0)}
        if c.layers:
            arrays["layers"] = list(c.layers)
        if self.within_format is not None:
            w = self.within_format
            tables["within_format"] = {
                "format": [f.format for f in w.per_format], "n": [f.n for f in w.per_format],
                "median_norm": [f.median_norm for f in w.per_format],
                "inside": [f.inside for f in w.per_format],
                **_interval_columns([f.correlation for f in w.per_format])}
            sides = (w.inside, w.outside)
            tables["within_format_mean"] = {"side": ["inside R", "outside R"],
                                            "n": [x.n_units if x else 0 for x in sides],
                                            **_interval_columns(sides)}
        provenance = {"kind": KIND, **c.provenance, "settings": dict(self.settings)}
        return StoreRecord(provenance, rows, arrays, tables)

    def to_store(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_record` to a new HDF5 store at ``path``; returns the path."""
        return write_record(path, self.to_record())

    @classmethod
    def from_store(cls, path: str | os.PathLike) -> Misalignment:
        """Read a study written by :meth:`to_store` (of this or older code)."""
        data = read_store(path)
        table = CandidateTable.from_data(data, Path(path))
        prov, a = data.provenance, data.arrays
        if "correlations/group" not in a:
            raise MisalignmentError(f"{path} holds measured candidates but no analysis: run misalignment("
                                    f"CandidateTable.from_store(path), radius) on them")
        settings = prov["settings"]
        t = data.table("correlations")
        groups = []
        for i, name in enumerate(t["group"]):
            corr = _interval_from_columns(t, i, t["n"][i], settings, "bootstrap", "candidates")
            groups.append(GroupCorrelation(str(name), float(t["lower"][i]), float(t["upper"][i]),
                                           int(t["n"][i]), corr))
        within = None
        if "within_format/format" in a:
            within = _within_format_from_tables(data.table("within_format"), data.table("within_format_mean"),
                                                settings)
        return cls(table, float(a["basin_radius"]), groups[0], groups[1], groups[2], tuple(groups[3:]),
                   settings, within)


def _within_format_from_tables(t: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray],
                               settings: Mapping[str, Any]) -> WithinFormat:
    per_format = tuple(FormatCorrelation(str(t["format"][i]), int(t["n"][i]), float(t["median_norm"][i]),
                                         bool(t["inside"][i]),
                                         _interval_from_columns(t, i, t["n"][i], settings, "bootstrap",
                                                                "candidates"))
                       for i in range(len(t["format"])))
    sides = [_interval_from_columns(mean, i, mean["n"][i], settings, "stratified bootstrap",
                                    "candidates within formats") for i in range(2)]
    return WithinFormat(per_format, sides[0], sides[1])


def misalignment(
    candidates: CandidateTable,
    basin_radius: float,
    *,
    bins: int | Sequence[float] = 4,
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Misalignment:
    """Spearman correlation of summed layer MSE and NLL over candidates, inside / outside ``basin_radius``, by
    bin and within each format (:func:`within_format_correlation`).

    Args:
        candidates: from :func:`~landscape.studies.candidates.measure_candidates`.
        basin_radius: R(w0), in the units of the displacement norms (> 0; ``inf``: every candidate is inside).
        bins: number of equal-count bins of displacement norm (edges at quantiles), or explicit increasing
            edges.
        level, n_resamples, seed: the bootstrap over candidates (the same seed for every group).
    """
    if not isinstance(candidates, CandidateTable):
        raise MisalignmentError(f"candidates must be a CandidateTable (measure_candidates), got "
                                f"{type(candidates).__name__}")
    if isinstance(basin_radius, bool) or not isinstance(basin_radius, (int, float)) or not basin_radius > 0:
        raise MisalignmentError(f"basin_radius must be a number > 0 (R(w0), in displacement-norm units), "
                                f"got {basin_radius!r}")
    check_interval_settings(level, n_resamples)
    norms = candidates.displacement_norm
    edges = _bin_edges(norms, bins)

    def group(name: str, lower: float, upper: float, include_lower: bool = False) -> GroupCorrelation:
        chosen = ((norms >= lower) if include_lower else (norms > lower)) & (norms <= upper)
        x, y = candidates.layer_mse_sum[chosen], candidates.nll[chosen]
        defined = chosen.sum() >= MIN_PAIRS and np.ptp(x) > 0 and np.ptp(y) > 0
        corr = rank_correlation(x, y, level=level, n_resamples=n_resamples, seed=seed) if defined else None
        return GroupCorrelation(name, lower, upper, int(chosen.sum()), corr)

    radius = float(basin_radius)
    per_bin = tuple(group(f"bin {i + 1}", float(lo), float(hi), include_lower=i == 0)
                    for i, (lo, hi) in enumerate(pairwise(edges)))
    return Misalignment(candidates, radius, group("all", 0.0, math.inf, include_lower=True),
                        group("inside R", 0.0, radius, include_lower=True),
                        group("outside R", radius, math.inf), per_bin,
                        {"level": level, "n_resamples": n_resamples, "seed": seed,
                         "bin_edges": edges.tolist(), "correlation": "Spearman(layer_mse_sum, nll)"},
                        within_format_correlation(candidates, radius, level=level, n_resamples=n_resamples,
                                                  seed=seed))


def _bin_edges(norms: np.ndarray, bins: int | Sequence[float]) -> np.ndarray:
    if isinstance(bins, int) and not isinstance(bins, bool):
        if bins < 1:
            raise MisalignmentError(f"bins must be >= 1 or a sequence of increasing edges, got {bins!r}")
        return np.quantile(norms, np.linspace(0, 1, bins + 1))
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
        raise MisalignmentError(f"bin edges must be >= 2 finite, strictly increasing numbers, "
                                f"got {list(bins)}")
    return edges
