"""The misalignment of local and global objectives: does a lower summed layer MSE mean a lower NLL?

Many quantized candidates around w0 (RTN, GPTQ, QAFT checkpoints, LoRC ranks... and, cheaply, random
on-grid roundings) are measured for their displacement norm ``||w_q - w0||``, their summed layer output MSE
(GPTQ's local objective) and their global token-mean NLL (QAFT's objective). :func:`misalignment` then
gives the Spearman rank correlation between summed MSE and NLL, with a bootstrap interval over candidates,

* over all candidates,
* **inside** the basin (``||w_q - w0|| <= R(w0)``) and **outside** it (``> R(w0)``), and
* in bins of displacement norm, and
* **within each format** (candidates on one grid, at similar distances), with the mean of those
  correlations over the formats inside and outside R,

so the paper's finding reads directly: inside the basin the two objectives agree (correlation near 1),
outside they do not. The within-format view matters when the candidates span several bit-widths: pooled
over formats, the bit-width orders both MSE and NLL and can hide that, on one grid, the candidate with the
lower MSE is not the one with the lower NLL.

**Random on-grid roundings** (:class:`RoundingSpec`, :func:`stochastic_rounding`): each weight goes to one of
the two grid points around it, the upper one with probability equal to its fractional position between
them (unbiased stochastic rounding, ``E[w_q] = w0`` inside the grid's range), on the very lattice RTN, GPTQ
and QAFT share (:func:`landscape.quant.formats.make_grid` of w0). ``fraction`` of the weights (chosen at
random) are rounded stochastically, the rest to nearest, so ``fraction`` sweeps the candidates from RTN
(0) to full stochastic rounding (1; about sqrt(2) x RTN's displacement norm). Every layer draws from its own
generator seeded by ``(seed, layer name)``: a candidate is a pure function of (w0, format, seed, fraction).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.objectives import layer_mse, nll
from landscape.quant.capture import resolve_layers
from landscape.quant.formats import QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult, read_result_metadata
from landscape.stats import DEFAULT_RESAMPLES, Interval
from landscape.store import StoreRecord, read_store, write_record
from landscape.studies.compare import (
    ComparisonError,
    check_interval_settings,
    check_layers_and_base,
    check_same_base,
)
from landscape.weights import quantizable_layers, swapped_weights, weight_matrix, weights_fingerprint

MIN_CANDIDATES = 3  # a rank correlation of fewer candidates is not reported


class MisalignmentError(ValueError):
    """Bad candidates or settings of a misalignment study."""


# ----------------------------------------------------------------------------- random roundings
@dataclass(frozen=True)
class RoundingSpec:
    """A random on-grid rounding of w0, regenerable from its fields (see the module docstring).

    Attributes:
        format: the weight format (its min-max grid on w0 is the lattice).
        seed: seed of the draws (each layer: its own generator seeded by ``(seed, layer name)``).
        fraction: share of the weights rounded stochastically (the rest round to nearest), in [0, 1].
        layers: layer names or globs (``None``: every quantizable layer).
    """

    format: QuantFormat | str
    seed: int
    fraction: float = 1.0
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", parse_format(self.format))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MisalignmentError(f"seed must be an integer, got {self.seed!r}")
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise MisalignmentError(f"fraction (share of weights rounded stochastically) must be in [0, 1], "
                                    f"got {self.fraction!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def label(self) -> str:
        return f"stochastic {self.format.name} f{self.fraction:g} s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format.name, "seed": self.seed, "fraction": self.fraction,
                "layers": list(self.layers) if self.layers is not None else None}


def stochastic_rounding(model: nn.Module, spec: RoundingSpec, model_name: str | None = None) -> QuantResult:
    """The random on-grid rounding ``spec`` of the model's weights w0, as a :class:`QuantResult`
    (method ``stochastic-rounding``; weights in the model's dtype and device; the model is not modified)."""
    names = resolve_layers(model, list(spec.layers) if spec.layers is not None else None, spec.format)
    modules = quantizable_layers(model)
    weights = {}
    with torch.no_grad():
        for name in names:
            w0 = weight_matrix(modules[name]).detach()
            grid = make_grid(w0, spec.format, name)
            scale = grid.per_column(grid.scale).double()  # (out, in)
            zero = grid.per_column(grid.zero).double()
            position = w0.double() / scale + zero  # in code units
            lower = torch.floor(position)
            generator = torch.Generator().manual_seed(_layer_seed(spec.seed, name))
            u_round = torch.rand(tuple(w0.shape), generator=generator, dtype=torch.float64).to(w0.device)
            u_pick = torch.rand(tuple(w0.shape), generator=generator, dtype=torch.float64).to(w0.device)
            stochastic = lower + (u_round < position - lower).double()
            codes = torch.where(u_pick < spec.fraction, stochastic, torch.round(position))
            codes = codes.clamp(spec.format.qmin, spec.format.qmax).to(w0.dtype)
            weights[name] = grid.dequantize(codes).contiguous()
    return QuantResult(
        weights=weights, format=spec.format, method="stochastic-rounding",
        settings={"seed": spec.seed, "fraction": spec.fraction, "grid": "min-max of w0, static groups",
                  "layers": list(spec.layers) if spec.layers is not None else None},
        base_model=model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__,
        base_fingerprint=weights_fingerprint(model, names))


def random_roundings(formats: Sequence[QuantFormat | str] | QuantFormat | str, seeds: Sequence[int],
                     fractions: Sequence[float] = (1.0,),
                     layers: Sequence[str] | None = None) -> dict[str, RoundingSpec]:
    """``label -> RoundingSpec`` for every format x fraction x seed (cheap: nothing is drawn until measured)."""
    formats = [formats] if isinstance(formats, (str, QuantFormat)) else list(formats)
    specs = [RoundingSpec(f, s, x, tuple(layers) if layers is not None else None)
             for f in formats for x in fractions for s in seeds]
    if not specs:
        raise MisalignmentError("random_roundings needs at least one format, fraction and seed")
    return {spec.label: spec for spec in specs}


def _layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one layer, from (seed, layer name)."""
    return int.from_bytes(hashlib.sha256(f"rounding/{seed}/{name}".encode()).digest()[:8], "little") >> 1


# ------------------------------------------------------------------------------------ candidates
Candidate = QuantResult | RoundingSpec


@dataclass(frozen=True)
class CandidateTable:
    """Displacement norm, summed layer MSE and NLL of each candidate.

    Attributes:
        labels, methods, formats: one entry per candidate.
        displacement_norm: ``||w_q - w0||`` over the candidate's layers (weight units).
        layer_mse_sum: output MSE summed over the candidate's layers, on the full-precision model's inputs
            (squared activations).
        nll: token-mean NLL (nats/token) on the evaluation data; ``nll_w0``: the same at w0.
        provenance: model fingerprint, data, NLL convention, candidates' specs.
    """

    labels: tuple[str, ...]
    methods: tuple[str, ...]
    formats: tuple[str, ...]
    displacement_norm: np.ndarray
    layer_mse_sum: np.ndarray
    nll: np.ndarray
    nll_w0: float
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: Sequence[bool] | np.ndarray) -> CandidateTable:
        """The candidates where ``keep`` (one bool per candidate) is True, e.g.
        ``table.subset(np.array(table.methods) != "stochastic-rounding")``."""
        mask = np.asarray(keep)
        if mask.dtype != np.bool_ or mask.shape != (len(self),):
            raise MisalignmentError(f"keep must be {len(self)} booleans (one per candidate), got an array of "
                                    f"dtype {mask.dtype} and shape {mask.shape}")
        index = np.flatnonzero(mask)
        pick = lambda values: tuple(values[i] for i in index)  # noqa: E731
        provenance = dict(self.provenance)
        if isinstance(provenance.get("candidates"), Mapping):
            provenance["candidates"] = {k: provenance["candidates"][k] for k in pick(self.labels)
                                        if k in provenance["candidates"]}
        return CandidateTable(pick(self.labels), pick(self.methods), pick(self.formats),
                              self.displacement_norm[index], self.layer_mse_sum[index], self.nll[index], self.nll_w0,
                              provenance)

    def markdown(self) -> str:
        order = np.argsort(self.displacement_norm, kind="stable")
        lines = ["| candidate | method | format | ‖w_q − w0‖ | layer-MSE sum | NLL | ΔNLL |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {self.labels[i]} | {self.methods[i]} | {self.formats[i]} | {self.displacement_norm[i]:.4g} | "
                  f"{self.layer_mse_sum[i]:.4g} | {self.nll[i]:.4f} | {self.nll[i] - self.nll_w0:+.4f} |"
                  for i in order]
        return "\n".join(lines)


def measure_candidates(
    model: nn.Module,
    candidates: Mapping[str, Candidate],
    data: TokenSet,
    *,
    mse_data: TokenSet | None = None,
    batch_size: int = 8,
    model_name: str = "",
    progress: bool = True,
) -> CandidateTable:
    """Measure every candidate: displacement norm, summed layer MSE (on ``mse_data``, default ``data``, with the
    full-precision model's inputs) and token-mean NLL on ``data``.

    Args:
        candidates: label -> :class:`QuantResult`, :class:`RoundingSpec` (built when measured) or the path of a
            saved QuantResult (loaded when measured), so many candidates of a large model never sit in
            memory together. A path's metadata is checked against the model before anything is measured.

    Raises:
        MisalignmentError / ComparisonError (ValueErrors): no candidates, results of another base, rounding
            formats that do not fit the layers; before any evaluation.
    """
    if not isinstance(candidates, Mapping) or not candidates:
        raise MisalignmentError("candidates must be a non-empty mapping label -> QuantResult or RoundingSpec")
    saved: dict[str, dict[str, Any]] = {}  # label -> metadata of a saved result given by its path
    for label, candidate in candidates.items():
        if isinstance(candidate, (str, os.PathLike)):
            saved[label] = _saved_metadata(model, label, candidate)
        elif not isinstance(candidate, (QuantResult, RoundingSpec)):
            raise MisalignmentError(f"candidate {label!r} is a {type(candidate).__name__}; accepted: QuantResult, "
                                    f"RoundingSpec, or the path of a saved QuantResult")
        if isinstance(candidate, RoundingSpec):  # checks the layers and that the format fits every one
            resolve_layers(model, list(candidate.layers) if candidate.layers is not None else None, candidate.format)
    check_same_base(model, {k: v for k, v in candidates.items() if isinstance(v, QuantResult)})
    mse_data = mse_data or data
    for name, value in (("data", data), ("mse_data", mse_data)):
        if not isinstance(value, TokenSet):
            raise MisalignmentError(f"{name} must be a landscape.data.TokenSet, got {type(value).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MisalignmentError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__

    center = nll(model, data, batch_size=batch_size, model_name=name)
    norms, mses, nlls, methods, formats = [], [], [], [], []
    for label, candidate in tqdm(candidates.items(), desc="candidates", disable=not progress):
        if isinstance(candidate, RoundingSpec):
            result = stochastic_rounding(model, candidate, name)
        elif label in saved:
            result = QuantResult.load(candidate)  # its base was checked above, from the metadata
        else:
            result = candidate
        weights = {n: w.to(weight_matrix(quantizable_layers(model)[n])) for n, w in result.weights.items()}
        norms.append(_displacement_norm(model, weights))
        mses.append(sum(layer_mse(model, mse_data, weights, inputs="reference", batch_size=batch_size).values()))
        with swapped_weights(model, weights):
            nlls.append(nll(model, data, batch_size=batch_size, model_name=name).value)
        methods.append(result.method)
        formats.append(result.format.name if result.format else "none")
    provenance = {
        "model": name,
        "model_fingerprint": weights_fingerprint(model),
        "data": data.provenance(),
        "nll_convention": center.convention.to_dict(),
        "mse_data": mse_data.provenance(),
        "mse_inputs": "full-precision model (reference)",
        "candidates": {label: _describe_candidate(c, saved.get(label)) for label, c in candidates.items()},
    }
    return CandidateTable(tuple(candidates), tuple(methods), tuple(formats), np.array(norms), np.array(mses),
                          np.array(nlls), center.value, provenance)


def _saved_metadata(model: nn.Module, label: str, path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the saved result at ``path`` after checking its layers and base against ``model``."""
    meta = read_result_metadata(path)
    check_layers_and_base(model, f"saved result {label!r} ({path})", meta["layers"], meta["base_model"],
                          meta["base_fingerprint"])
    return meta


def _describe_candidate(candidate: Any, meta: dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(candidate, RoundingSpec):
        return candidate.to_dict() | {"kind": "random rounding"}
    if meta is not None:
        return {"kind": "saved quant result", "path": str(candidate), "method": meta["method"],
                "settings": meta["settings"], "base_fingerprint": meta["base_fingerprint"]}
    return {"kind": "quant result", "method": candidate.method, "settings": candidate.settings,
            "base_fingerprint": candidate.base_fingerprint}


def _displacement_norm(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> float:
    modules = quantizable_layers(model)
    return math.sqrt(sum(float((w.double() - weight_matrix(modules[n]).detach().double()).pow(2).sum())
                         for n, w in weights.items()))


# ------------------------------------------------------------------------------ rank correlation
def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average rank).
    NaN when either variable is constant."""
    rx = scipy_stats.rankdata(np.asarray(x, dtype=np.float64))
    ry = scipy_stats.rankdata(np.asarray(y, dtype=np.float64))
    return float(_pearson_rows(rx[None], ry[None])[0])


def rank_correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, level: float = 0.95,
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, unit: str = "candidates") -> Interval:
    """Spearman correlation of paired values with a percentile-bootstrap interval over the pairs.

    A resample draws ``n`` pairs with replacement and recomputes the rank correlation; resamples in which a
    variable is constant (correlation undefined) are dropped before taking the quantiles.

    Raises:
        MisalignmentError: fewer than 3 pairs, lengths that differ, non-finite values, or a constant variable.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise MisalignmentError(f"x and y must be 1-D of equal length, got shapes {xs.shape} and {ys.shape}")
    if len(xs) < MIN_CANDIDATES:
        raise MisalignmentError(f"a rank correlation needs at least {MIN_CANDIDATES} pairs, got {len(xs)}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise MisalignmentError("x and y must be finite")
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        raise MisalignmentError("a rank correlation is undefined when one variable is constant")
    try:
        check_interval_settings(level, n_resamples)
    except ComparisonError as err:
        raise MisalignmentError(str(err)) from None
    index = np.random.default_rng(seed).integers(0, len(xs), size=(n_resamples, len(xs)))
    boot = _pearson_rows(scipy_stats.rankdata(xs[index], axis=1), scipy_stats.rankdata(ys[index], axis=1))
    boot = boot[np.isfinite(boot)]
    low, high = (np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot.size else (math.nan, math.nan))
    return Interval(spearman(xs, ys), float(low), float(high), level, "bootstrap", n_resamples, len(xs), unit)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN where a row is constant)."""
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


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


def _interval_from_columns(t: Mapping[str, np.ndarray], i: int, n: int, settings: Mapping[str, Any], method: str,
                           unit: str) -> Interval | None:
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
        correlation: Spearman with its bootstrap interval over the format's candidates; ``None`` with fewer than
            3 candidates or a constant variable.
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
    variable constant); its interval is a stratified bootstrap: each resample redraws every format's candidates
    with replacement (formats in ``per_format`` order, one generator seeded by ``seed`` per side), recomputes each
    format's correlation and averages them; resamples in which a format's correlation is undefined are dropped.

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
    """Spearman(summed layer MSE, NLL) among the candidates of each format, and its mean over the formats inside
    (median ``||d|| <= basin_radius``) and outside R, with stratified bootstrap intervals (see :class:`WithinFormat`).
    """
    x_all, y_all, norms = candidates.layer_mse_sum, candidates.nll, candidates.displacement_norm
    formats = np.asarray(candidates.formats, dtype=object)
    groups = {f: np.flatnonzero(formats == f) for f in dict.fromkeys(candidates.formats)}
    order = sorted(groups, key=lambda f: (float(np.median(norms[groups[f]])), f))
    per_format, members = [], {}
    for f in order:
        index = groups[f]
        x, y = x_all[index], y_all[index]
        defined = len(index) >= MIN_CANDIDATES and np.ptp(x) > 0 and np.ptp(y) > 0
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
            boot += _pearson_rows(scipy_stats.rankdata(x_all[draw], axis=1), scipy_stats.rankdata(y_all[draw], axis=1))
        boot = boot[np.isfinite(boot)] / len(chosen)
        low, high = (np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot.size else (math.nan, math.nan))
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
                 (f"{len(c)} candidates; NLL(w0) = {c.nll_w0:.4f} nats/token; R(w0) = {self.basin_radius:.4g}; "
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
        """One point per candidate (norm, MSE sum, NLL, inside flag), the group correlations as a table, and
        the candidates' labels, methods and formats as a table."""
        c = self.candidates
        groups = (self.overall, self.inside, self.outside, *self.bins)
        rows = {"displacement_norm": c.displacement_norm, "layer_mse_sum": c.layer_mse_sum, "nll": c.nll,
                "inside_basin": c.displacement_norm <= self.basin_radius}
        tables = {"candidates": {"label": list(c.labels), "method": list(c.methods), "format": list(c.formats)},
                  "correlations": {"group": [g.name for g in groups], "lower": [g.lower for g in groups],
                                   "upper": [g.upper for g in groups], "n": [g.n for g in groups],
                                   **_interval_columns([g.correlation for g in groups])}}
        arrays = {"basin_radius": np.float64(self.basin_radius), "nll_w0": np.float64(c.nll_w0)}
        if self.within_format is not None:
            w = self.within_format
            tables["within_format"] = {
                "format": [f.format for f in w.per_format], "n": [f.n for f in w.per_format],
                "median_norm": [f.median_norm for f in w.per_format], "inside": [f.inside for f in w.per_format],
                **_interval_columns([f.correlation for f in w.per_format])}
            sides = (w.inside, w.outside)
            tables["within_format_mean"] = {"side": ["inside R", "outside R"],
                                            "n": [x.n_units if x else 0 for x in sides], **_interval_columns(sides)}
        provenance = {"kind": "misalignment", **c.provenance, "settings": dict(self.settings)}
        return StoreRecord(provenance, rows, arrays, tables)

    def to_store(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_record` to a new HDF5 store at ``path``; returns the path."""
        return write_record(path, self.to_record())

    @classmethod
    def from_store(cls, path: str | os.PathLike) -> Misalignment:
        """Read a study written by :meth:`to_store`."""
        data = read_store(path)
        prov, a = data.provenance, data.arrays
        if prov.get("kind") != "misalignment":
            raise MisalignmentError(f"{path} holds a {prov.get('kind')!r} run, not a misalignment study")
        settings = prov["settings"]
        names = data.table("candidates")
        table = CandidateTable(tuple(map(str, names["label"])), tuple(map(str, names["method"])),
                               tuple(map(str, names["format"])), a["displacement_norm"], a["layer_mse_sum"], a["nll"],
                               float(a["nll_w0"]), {k: v for k, v in prov.items() if k not in ("kind", "settings")})
        t = data.table("correlations")
        groups = []
        for i, name in enumerate(t["group"]):
            corr = _interval_from_columns(t, i, t["n"][i], settings, "bootstrap", "candidates")
            groups.append(GroupCorrelation(str(name), float(t["lower"][i]), float(t["upper"][i]), int(t["n"][i]), corr))
        within = None
        if "within_format/format" in a:
            within = _within_format_from_tables(data.table("within_format"), data.table("within_format_mean"),
                                                settings)
        return cls(table, float(a["basin_radius"]), groups[0], groups[1], groups[2], tuple(groups[3:]), settings,
                   within)


def _within_format_from_tables(t: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray],
                               settings: Mapping[str, Any]) -> WithinFormat:
    per_format = tuple(FormatCorrelation(str(t["format"][i]), int(t["n"][i]), float(t["median_norm"][i]),
                                         bool(t["inside"][i]),
                                         _interval_from_columns(t, i, t["n"][i], settings, "bootstrap", "candidates"))
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
    """Spearman correlation of summed layer MSE and NLL over candidates, inside / outside ``basin_radius``, by bin
    and within each format (:func:`within_format_correlation`).

    Args:
        candidates: from :func:`measure_candidates`.
        basin_radius: R(w0), in the units of the displacement norms (> 0; ``inf``: every candidate is inside).
        bins: number of equal-count bins of displacement norm (edges at quantiles), or explicit increasing edges.
        level, n_resamples, seed: the bootstrap over candidates (the same seed for every group).
    """
    if not isinstance(candidates, CandidateTable):
        raise MisalignmentError(f"candidates must be a CandidateTable (measure_candidates), got "
                                f"{type(candidates).__name__}")
    if isinstance(basin_radius, bool) or not isinstance(basin_radius, (int, float)) or not basin_radius > 0:
        raise MisalignmentError(f"basin_radius must be a number > 0 (R(w0), in displacement-norm units), "
                                f"got {basin_radius!r}")
    try:
        check_interval_settings(level, n_resamples)
    except ComparisonError as err:
        raise MisalignmentError(str(err)) from None
    norms = candidates.displacement_norm
    edges = _bin_edges(norms, bins)

    def group(name: str, lower: float, upper: float, include_lower: bool = False) -> GroupCorrelation:
        chosen = ((norms >= lower) if include_lower else (norms > lower)) & (norms <= upper)
        x, y = candidates.layer_mse_sum[chosen], candidates.nll[chosen]
        defined = chosen.sum() >= MIN_CANDIDATES and np.ptp(x) > 0 and np.ptp(y) > 0
        corr = rank_correlation(x, y, level=level, n_resamples=n_resamples, seed=seed) if defined else None
        return GroupCorrelation(name, lower, upper, int(chosen.sum()), corr)

    radius = float(basin_radius)
    per_bin = tuple(group(f"bin {i + 1}", float(lo), float(hi), include_lower=i == 0)
                    for i, (lo, hi) in enumerate(pairwise(edges)))
    return Misalignment(candidates, radius, group("all", 0.0, math.inf, include_lower=True),
                        group("inside R", 0.0, radius, include_lower=True), group("outside R", radius, math.inf),
                        per_bin, {"level": level, "n_resamples": n_resamples, "seed": seed, "bin_edges": edges.tolist(),
                                  "correlation": "Spearman(layer_mse_sum, nll)"},
                        within_format_correlation(candidates, radius, level=level, n_resamples=n_resamples, seed=seed))


def _bin_edges(norms: np.ndarray, bins: int | Sequence[float]) -> np.ndarray:
    if isinstance(bins, int) and not isinstance(bins, bool):
        if bins < 1:
            raise MisalignmentError(f"bins must be >= 1 or a sequence of increasing edges, got {bins!r}")
        return np.quantile(norms, np.linspace(0, 1, bins + 1))
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
        raise MisalignmentError(f"bin edges must be >= 2 finite, strictly increasing numbers, got {list(bins)}")
    return edges
