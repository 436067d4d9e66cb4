"""The PTQ-difficulty score against cheaper predictors of the GPTQ-QAFT gap (beyond the paper).

:mod:`landscape.studies.predict` asks whether ``score = ||d_RTN|| / R(w0)`` ranks models and formats by how
far GPTQ falls behind QAFT. A score is only worth its basin search if it beats what is known for free.
Candidates, each oriented so that a larger value should mean a larger gap (decided before any result):

* ``score``: ``||w_RTN - w0|| / R(w0)`` (needs R(w0): NLL evaluations along random directions);
* ``relative_norm``: ``||w_RTN - w0|| / ||w0||`` (no data at all);
* ``neg_sqnr``: minus RTN's signal-to-quantization-noise ratio, the mean over layers of each layer's
  ``10 log10(||w||^2 / ||w - w_RTN||^2)`` dB (the family of features the authors' companion paper,
  arXiv 2410.12119, predicts PTQ loss from). Over all layers at once it would be a monotone function of
  ``relative_norm``; the per-layer mean is not;
* ``nll_w0``: the full-precision model's NLL on the evaluation text.

For each: Spearman(candidate, gap) with a bootstrap interval over cases; leave-one-model-out and
leave-one-format-out (the correlation on the cases left when one model, or one format, is removed: its
smallest value says how much one group carries the result); Spearman within each model (across its
formats only); and the paired bootstrap interval of ``rho(score) - rho(candidate)`` (the same resamples of
cases for both). Within one model R(w0) and ``||w0||`` are constants, so the score and ``relative_norm`` rank
its formats identically and NLL(w0) does not vary: what the basin radius adds is only seen across models.
Gaps are raw or control-adjusted as the cases are (:class:`~landscape.studies.predict.PredictionCase`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats as scipy_stats
from torch import nn

from landscape.quant import parse_format, rtn, sqnr_db
from landscape.quant.formats import QuantFormat
from landscape.stats import (
    DEFAULT_RESAMPLES,
    MIN_PAIRS,
    Interval,
    check_interval_settings,
    pearson_rows,
    rank_correlation,
    spearman,
)
from landscape.store import StoreData, finish_run, start_run
from landscape.studies.predict import PredictionCase, PredictionError, cases_from_quant_table
from landscape.studies.quant_table import QuantTable
from landscape.weights import Base, LayerSelection, as_base, quantizable_layers, weight_matrix

PREDICTORS: dict[str, Callable[[PredictionCase], float]] = {
    "score": lambda c: c.score,
    "relative_norm": lambda c: c.rtn_displacement_norm / c.weights_norm,
    "neg_sqnr": lambda c: -c.rtn_sqnr_db,
    "nll_w0": lambda c: c.nll_w0,
}
"""name -> the candidate's value on a case, larger meaning "GPTQ falls further behind" a priori."""


@dataclass(frozen=True)
class RTNFeatures:
    """What RTN alone says about a model at a format (no data): ``mean_sqnr_db`` over layers (dB),
    ``weights_norm`` ``||w0||`` and ``rtn_norm`` ``||w_RTN - w0||`` over the same layers (weight units)."""

    mean_sqnr_db: float
    weights_norm: float
    rtn_norm: float


def rtn_features(model: nn.Module | Base, fmt: QuantFormat | str,
                 layers: LayerSelection = None) -> RTNFeatures:
    """RTN's per-layer SQNR (mean in dB) and the norms of w0 and of RTN's displacement over ``layers``."""
    base = as_base(model)
    result = rtn(base, fmt, layers)
    modules = quantizable_layers(base.model)
    sqnr, w0_sq, d_sq = [], 0.0, 0.0
    for name, w_q in result.weights.items():
        w0 = weight_matrix(modules[name]).detach()
        sqnr.append(sqnr_db(w0, w_q))
        w0_sq += float(w0.double().pow(2).sum())
        d_sq += float((w_q.double() - w0.double()).pow(2).sum())
    return RTNFeatures(float(np.mean(sqnr)), math.sqrt(w0_sq), math.sqrt(d_sq))


def with_features(case: PredictionCase, features: RTNFeatures, nll_w0: float) -> PredictionCase:
    """``case`` with the baselines' inputs filled in."""
    return replace(case, rtn_sqnr_db=features.mean_sqnr_db, weights_norm=features.weights_norm, nll_w0=nll_w0)


FEATURE_ARRAYS = {"mean_sqnr_db": ((), np.float64), "weights_norm": ((), np.float64),
                  "rtn_norm": ((), np.float64)}


def measure_rtn_features(model: nn.Module | Base, formats: Sequence[QuantFormat | str],
                         path: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> Path:
    """:func:`rtn_features` at every one of ``formats`` into a new store at ``path`` (kind ``rtn_features``,
    one point per format, resumed point by point), so that the predictor comparison is made from stores."""
    names = [parse_format(f).name if isinstance(f, str) else f.name for f in formats]  # bad names fail here
    if len(set(names)) < len(names):
        raise ValueError(f"formats must be distinct, got {names}")
    base = as_base(model)
    prov = {"kind": "rtn_features", **(provenance or {}), "formats": names}
    with start_run(path, prov, FEATURE_ARRAYS, grid_shape=(len(names),), resume=True) as record:
        for i, name in enumerate(names):
            if not record.done[i]:
                f = rtn_features(base, name)
                record.write_point(i, {"mean_sqnr_db": f.mean_sqnr_db, "weights_norm": f.weights_norm,
                                       "rtn_norm": f.rtn_norm})
        _, out = finish_run(record)
    return out


def read_rtn_features(store: StoreData) -> dict[str, RTNFeatures]:
    """format -> :class:`RTNFeatures` of a :func:`measure_rtn_features` store."""
    if store.provenance.get("kind") != "rtn_features" or not store.done.all():
        raise PredictionError(f"not a finished rtn_features store (kind {store.provenance.get('kind')!r})")
    return {name: RTNFeatures(*(float(store.arrays[a][i]) for a in FEATURE_ARRAYS))
            for i, name in enumerate(store.provenance["formats"])}


def model_cases(tables: Sequence[QuantTable], basin_radius: float, features: Mapping[str, RTNFeatures], *,
                corpus: str = "wiki", adjust_for_control: bool = False) -> list[PredictionCase]:
    """One model's cases, with the baselines' inputs: every format with RTN, GPTQ and QAFT rows in
    ``tables`` (a format in several tables counts once, from the first), ``features`` from
    :func:`read_rtn_features`. RTN's displacement norm must agree with the features' (same model and layers).

    Raises:
        PredictionError: a format without features, or an RTN norm that disagrees with them by more than
            1e-4 relative (the table and the features were not measured on the same weights).
    """
    cases: dict[str, PredictionCase] = {}
    for table in tables:
        for case in cases_from_quant_table(table, basin_radius, corpus=corpus,
                                           adjust_for_control=adjust_for_control):
            cases.setdefault(case.format, case)
    out = []
    for fmt, case in cases.items():
        if fmt not in features:
            raise PredictionError(f"{case.model} {fmt}: no RTN features (measured: {sorted(features)})")
        f = features[fmt]
        if not math.isclose(f.rtn_norm, case.rtn_displacement_norm, rel_tol=1e-4):
            raise PredictionError(f"{case.model} {fmt}: the table's ||d_RTN|| = "
                                  f"{case.rtn_displacement_norm:.6g} but the features' is {f.rtn_norm:.6g}: "
                                  f"not the same weights")
        out.append(with_features(case, f, case.nll_w0))
    return out


@dataclass(frozen=True)
class CandidateResult:
    """One candidate predictor on the cases.

    Attributes:
        name: a key of :data:`PREDICTORS`.
        rank_correlation: Spearman(candidate, gap) with its bootstrap interval over cases.
        leave_one_model_out, leave_one_format_out: the left-out model (format) -> Spearman on the other cases
            (NaN where fewer than 3 remain or one variable is constant there).
        within_model: model -> Spearman over that model's cases alone (NaN where it has fewer than 3 cases or
            one variable is constant there, as NLL(w0) always is).
        versus_score: ``rho(score) - rho(candidate)``, paired bootstrap over cases (``None`` for the score).
    """

    name: str
    rank_correlation: Interval
    leave_one_model_out: dict[str, float]
    leave_one_format_out: dict[str, float]
    versus_score: Interval | None
    within_model: dict[str, float]


@dataclass(frozen=True)
class PredictorComparison:
    """Every candidate of :data:`PREDICTORS` on the same cases (see the module docstring)."""

    cases: tuple[PredictionCase, ...]
    candidates: tuple[CandidateResult, ...]

    def best(self) -> str:
        """The candidate with the largest Spearman correlation with the gap."""
        return max(self.candidates, key=lambda c: c.rank_correlation.value).name

    def markdown(self) -> str:
        adjusted = any(c.control_gain for c in self.cases)
        lines = [f"# Predictors of the GPTQ-QAFT gap{' (control-adjusted)' if adjusted else ''}: "
                 f"{len(self.cases)} cases, {len({c.model for c in self.cases})} models, "
                 f"{len({c.format for c in self.cases})} formats", "",
                 "| candidate | Spearman with gap [95 %] | min leave-one-model-out "
                 "| min leave-one-format-out | within each model | rho(score) − rho(candidate) [95 %] |",
                 "|---|---|---|---|---|---|"]
        for c in self.candidates:
            rho, vs = c.rank_correlation, c.versus_score
            within = ", ".join(f"{m} {v:+.2f}" for m, v in c.within_model.items()
                               if math.isfinite(v)) or "n/a"
            lines.append(f"| {c.name} | {rho.value:+.3f} [{rho.low:+.3f}, {rho.high:+.3f}] | "
                         f"{_minimum(c.leave_one_model_out)} | {_minimum(c.leave_one_format_out)} | "
                         f"{within} | "
                         + (f"{vs.value:+.3f} [{vs.low:+.3f}, {vs.high:+.3f}] |" if vs else "— |"))
        lines += ["", f"largest correlation: {self.best()}"]
        return "\n".join(lines)


def compare_predictors(cases: Sequence[PredictionCase], *, level: float = 0.95,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PredictorComparison:
    """Every candidate of :data:`PREDICTORS` against the measured gaps of ``cases``.

    Raises:
        PredictionError: fewer than 3 cases, duplicate (model, format) cases, a case without the baselines'
            inputs (:func:`with_features`), or a constant candidate or gap; before any resampling.
    """
    cases = tuple(cases)
    if len(cases) < MIN_PAIRS:
        raise PredictionError(f"comparing predictors needs at least {MIN_PAIRS} cases, got {len(cases)}")
    keys = [(c.model, c.format) for c in cases]
    if len(set(keys)) < len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise PredictionError(f"duplicate cases (model, format): {duplicates}")
    missing = [f"{c.model} {c.format}" for c in cases
               if not all(math.isfinite(v) for v in (c.rtn_sqnr_db, c.weights_norm, c.nll_w0))]
    if missing:
        raise PredictionError(f"cases {missing} lack RTN's SQNR, ||w0|| or NLL(w0): fill them with "
                              f"with_features(case, rtn_features(model, format), nll_w0)")
    check_interval_settings(level, n_resamples)
    gaps = np.array([c.gap for c in cases])
    values = {name: np.array([f(c) for c in cases]) for name, f in PREDICTORS.items()}
    constant = [name for name, v in {"gap": gaps, **values}.items() if np.ptp(v) == 0]
    if constant:
        raise PredictionError(f"{constant} take one value over every case: no rank correlation is defined")
    index = np.random.default_rng(seed).integers(0, len(cases), size=(n_resamples, len(cases)))
    gap_ranks = scipy_stats.rankdata(gaps[index], axis=1)
    boot = {name: pearson_rows(scipy_stats.rankdata(v[index], axis=1), gap_ranks)
            for name, v in values.items()}
    models, formats = [c.model for c in cases], [c.format for c in cases]
    results = []
    for name, v in values.items():
        rho = rank_correlation(v, gaps, level=level, n_resamples=n_resamples, seed=seed, unit="cases")
        versus = None
        if name != "score":
            diff = boot["score"] - boot[name]
            diff = diff[np.isfinite(diff)]
            low, high = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
            versus = Interval(spearman(values["score"], gaps) - rho.value, float(low), float(high), level,
                              "paired bootstrap", n_resamples, len(cases), "cases")
        results.append(CandidateResult(name, rho, leave_one_out(v, gaps, models),
                                       leave_one_out(v, gaps, formats), versus,
                                       within_groups(v, gaps, models)))
    return PredictorComparison(cases, tuple(results))


def leave_one_out(x: np.ndarray, y: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """group -> Spearman(x, y) over the cases not in that group (NaN where undefined)."""
    return _spearman_by_group(x, y, groups, inside=False)


def within_groups(x: np.ndarray, y: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """group -> Spearman(x, y) over the cases of that group alone (NaN where undefined)."""
    return _spearman_by_group(x, y, groups, inside=True)


def _spearman_by_group(x: np.ndarray, y: np.ndarray, groups: Sequence[str], inside: bool) -> dict[str, float]:
    """group -> Spearman(x, y) over the group's cases (``inside``) or over all the others; NaN where fewer
    than 3 cases remain or either variable is constant on them."""
    groups = np.asarray(groups)
    out = {}
    for g in dict.fromkeys(groups.tolist()):
        keep = (groups == g) if inside else (groups != g)
        xs, ys = x[keep], y[keep]
        defined = keep.sum() >= MIN_PAIRS and np.ptp(xs) > 0 and np.ptp(ys) > 0
        out[str(g)] = spearman(xs, ys) if defined else math.nan
    return out


def _minimum(rhos: Mapping[str, float]) -> str:
    finite = {k: v for k, v in rhos.items() if math.isfinite(v)}
    if not finite:
        return "n/a"
    worst = min(finite, key=finite.get)
    return f"{finite[worst]:+.3f} (without {worst})"
