"""Predict, before any fine-tuning, where GPTQ will fall far behind QAFT (beyond the paper).

The paper's explanation suggests a cheap predictor: quantization fails for a local (layer-wise) method
when it has to leave the attractive basin of w0. Round-to-nearest needs no data and no solver, and the
basin radius R(w0) needs only NLL evaluations along random directions, so

    score = ||w_RTN - w0|| / R(w0)                       (both over the same layers, weight units)

is known before GPTQ or QAFT run. The rule: **GPTQ falls far behind QAFT when score > 1** (RTN's
displacement leaves the basin). :func:`evaluate_predictor` checks it on measured cases (models x formats):

* the Spearman rank correlation of score and the measured gap ``NLL(GPTQ) - NLL(QAFT)`` (nats/token),
  with a bootstrap interval over cases: does the score rank the formats and models by difficulty?
* the accuracy of the threshold rule against "GPTQ is far behind" = ``gap > gap_threshold``
  (default 0.1 nats/token, the basin's default NLL threshold), with its confusion counts.

Measured gaps come from quant-table stores (:func:`cases_from_quant_table` reads
:func:`landscape.studies.quant_table.read_quant_table` rows), R(w0) from
:func:`landscape.engine.basin.basin_statistics`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landscape.stats import DEFAULT_RESAMPLES, MIN_PAIRS, Interval, check_interval_settings, rank_correlation
from landscape.store import StoreRecord, read_store, write_record
from landscape.studies.quant_table import QuantTable

DEFAULT_SCORE_THRESHOLD = 1.0
DEFAULT_GAP_THRESHOLD = 0.1  # nats/token: "far behind"
BASELINE_INPUTS = ("rtn_sqnr_db", "weights_norm", "nll_w0")  # the baseline predictors' PredictionCase fields


class PredictionError(ValueError):
    """Bad cases, measurements or thresholds for the PTQ-difficulty predictor."""


def difficulty_score(rtn_displacement_norm: float, basin_radius: float) -> float:
    """``||w_RTN - w0|| / R(w0)`` (dimensionless; ``0`` when no basin edge was found, ``R = inf``).

    Raises:
        PredictionError: a norm that is negative or not finite, or a radius that is not > 0.
    """
    if not (isinstance(rtn_displacement_norm, (int, float)) and math.isfinite(rtn_displacement_norm)
            and rtn_displacement_norm >= 0):
        raise PredictionError(f"the RTN displacement norm must be a finite number >= 0, "
                              f"got {rtn_displacement_norm!r}")
    if not (isinstance(basin_radius, (int, float)) and basin_radius > 0):
        raise PredictionError(f"the basin radius R(w0) must be a number > 0 (inf if none was found), "
                              f"got {basin_radius!r}")
    return float(rtn_displacement_norm / basin_radius)


def predicts_gptq_behind(score: float, threshold: float = DEFAULT_SCORE_THRESHOLD) -> bool:
    """The rule: GPTQ falls far behind QAFT when ``score > threshold`` (default 1: RTN leaves the basin)."""
    return bool(score > threshold)


@dataclass(frozen=True)
class PredictionCase:
    """One model at one format: the predictor's inputs and the measured outcome.

    Attributes:
        model, format: what was quantized.
        rtn_displacement_norm: ``||w_RTN - w0||`` (weight units); ``basin_radius``: R(w0) in the same units.
        nll_gptq, nll_qaft: measured token-mean NLL (nats/token) on the same evaluation data (QAFT: mean
            over its seeds).
        control_gain: what fine-tuning the same weights in full precision on the same calibration data gains,
            ``NLL(w0) - NLL(control)`` (nats/token, control averaged over seeds); 0 when not adjusted. The gap
            then counts only the part of QAFT's advantage that is not adaptation to the calibration text.
        rtn_sqnr_db, weights_norm, nll_w0: the inputs of the baseline predictors
            (:mod:`landscape.studies.baselines`): RTN's mean per-layer SQNR (dB), ``||w0||`` over the same
            layers, NLL(w0) on the same evaluation text; NaN when not measured.
    """

    model: str
    format: str
    rtn_displacement_norm: float
    basin_radius: float
    nll_gptq: float
    nll_qaft: float
    control_gain: float = 0.0
    rtn_sqnr_db: float = math.nan
    weights_norm: float = math.nan
    nll_w0: float = math.nan

    def __post_init__(self) -> None:
        difficulty_score(self.rtn_displacement_norm, self.basin_radius)  # validates both
        for name in ("nll_gptq", "nll_qaft", "control_gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise PredictionError(f"{self.model} {self.format}: {name} must be a finite number, "
                                      f"got {value!r}")

    @property
    def score(self) -> float:
        return difficulty_score(self.rtn_displacement_norm, self.basin_radius)

    @property
    def gap(self) -> float:
        """``NLL(GPTQ) - NLL(QAFT) - control_gain`` (nats/token): how far GPTQ falls behind (beyond
        adaptation, when ``control_gain`` is set)."""
        return self.nll_gptq - self.nll_qaft - self.control_gain


def cases_from_quant_table(
    table: QuantTable | Sequence[Mapping[str, Any]],
    basin_radius: float,
    *,
    model: str | None = None,
    corpus: str = "wiki",
    gptq_method: str = "gptq",
    qaft_method: str = "qaft",
    adjust_for_control: bool = False,
) -> list[PredictionCase]:
    """One :class:`PredictionCase` per format of a quant table that has RTN, GPTQ and QAFT rows.

    Args:
        table: a :class:`landscape.studies.quant_table.QuantTable` or its rows (dicts with ``method``,
            ``format``, ``act_bits``, ``displacement_norm`` and ``nll`` = corpus -> NLL).
        basin_radius: R(w0) of the table's model over the same layers as its displacement norms.
        model: the model's name (default: the table's provenance ``model``; required for bare rows).
        corpus: which evaluation corpus's NLL is the outcome.
        gptq_method, qaft_method: the table's method names of the two contenders (QAFT rows of several
            seeds are averaged). Rows with quantized activations are ignored.
        adjust_for_control: subtract the full-precision control's gain (``fp32`` row minus the mean of the
            ``fp-finetune`` rows) from each gap; the table must have both.

    Formats missing one of the three methods are skipped with a warning naming them. NLL(w0) is the table's
    ``fp32`` row (NaN without one); RTN's SQNR and ``||w0||`` are left to
    :func:`landscape.studies.baselines.with_features`.
    """
    rows = getattr(table, "rows", table)
    name = model or getattr(table, "provenance", {}).get("model")
    if not name:
        raise PredictionError("pass model=... (the rows do not say which model they measured)")
    if not isinstance(rows, Sequence) or not rows:
        raise PredictionError("the quant table has no rows")
    corpora = set(rows[0].get("nll", {}))
    if corpus not in corpora:
        raise PredictionError(f"corpus {corpus!r} was not evaluated in this table; it has {sorted(corpora)}")
    by_format: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        if row.get("format") and not row.get("act_bits"):
            by_format.setdefault(str(row["format"]), {}).setdefault(str(row["method"]), []).append(row)
    fp32_rows = [r for r in rows if r.get("method") == "fp32"]
    nll_w0 = float(fp32_rows[0]["nll"][corpus]) if fp32_rows else math.nan
    control_gain = 0.0
    if adjust_for_control:
        fp32 = [r for r in rows if r.get("method") == "fp32"]
        controls = [r for r in rows if r.get("method") == "fp-finetune"]
        if not fp32 or not controls:
            raise PredictionError(f"{name}: adjust_for_control needs the table's fp32 and fp-finetune rows "
                                  f"(it has methods {sorted({str(r.get('method')) for r in rows})})")
        control_gain = float(fp32[0]["nll"][corpus] - np.mean([r["nll"][corpus] for r in controls]))
    cases, incomplete = [], []
    for fmt, methods in by_format.items():
        if not all(methods.get(m) for m in ("rtn", gptq_method, qaft_method)):
            incomplete.append(fmt)
            continue
        cases.append(PredictionCase(
            str(name), fmt, float(methods["rtn"][0]["displacement_norm"]), basin_radius,
            float(np.mean([r["nll"][corpus] for r in methods[gptq_method]])),
            float(np.mean([r["nll"][corpus] for r in methods[qaft_method]])), control_gain, nll_w0=nll_w0))
    if incomplete:
        warnings.warn(f"{name}: formats {incomplete} lack an rtn, {gptq_method} or {qaft_method} row "
                      f"and were skipped", stacklevel=2)
    if not cases:
        raise PredictionError(f"{name}: no format has rtn, {gptq_method} and {qaft_method} rows")
    return cases


@dataclass(frozen=True)
class PredictorEvaluation:
    """How well ``score = ||d_RTN|| / R(w0)`` predicts that GPTQ falls far behind QAFT.

    Attributes:
        cases: the measured cases (models x formats).
        score_threshold: the rule predicts "GPTQ far behind" when ``score > score_threshold``.
        gap_threshold: a case *is* "GPTQ far behind" when ``gap > gap_threshold`` (nats/token).
        rank_correlation: Spearman(score, gap) with a bootstrap interval over cases (``None`` with fewer
            than 3 cases or a constant score or gap).
    """

    cases: tuple[PredictionCase, ...]
    score_threshold: float
    gap_threshold: float
    rank_correlation: Interval | None

    @property
    def scores(self) -> np.ndarray:
        return np.array([c.score for c in self.cases])

    @property
    def gaps(self) -> np.ndarray:
        return np.array([c.gap for c in self.cases])

    @property
    def predicted(self) -> np.ndarray:
        """Boolean: the rule says GPTQ falls far behind."""
        return self.scores > self.score_threshold

    @property
    def actual(self) -> np.ndarray:
        """Boolean: GPTQ measured far behind (``gap > gap_threshold``)."""
        return self.gaps > self.gap_threshold

    @property
    def accuracy(self) -> float:
        """Share of cases where the rule is right."""
        return float(np.mean(self.predicted == self.actual))

    @property
    def confusion(self) -> dict[str, int]:
        """Counts of true/false positives/negatives ("positive": GPTQ far behind)."""
        p, a = self.predicted, self.actual
        return {"true_positive": int(np.sum(p & a)), "false_positive": int(np.sum(p & ~a)),
                "true_negative": int(np.sum(~p & ~a)), "false_negative": int(np.sum(~p & a))}

    def markdown(self) -> str:
        rho = self.rank_correlation
        rho_text = (f"{rho.value:+.3f} [{rho.low:+.3f}, {rho.high:+.3f}] ({rho.level:.0%} bootstrap over "
                    f"{rho.n_units} cases)" if rho else "n/a (needs >= 3 cases with varying score and gap)")
        adjusted = any(c.control_gain for c in self.cases)
        gap = "NLL(GPTQ) − NLL(QAFT) − control gain" if adjusted else "NLL(GPTQ) − NLL(QAFT)"
        lines = ["# PTQ-difficulty predictor: score = ‖w_RTN − w0‖ / R(w0)",
                 (f"rule: GPTQ falls far behind QAFT when score > {self.score_threshold:g}; "
                  f"measured 'far behind': {gap} > {self.gap_threshold:g} nats/token"), "",
                 "| model | format | ‖w_RTN − w0‖ | R(w0) | score | "
                 + ("control gain | " if adjusted else "") + "gap (nats) | predicted | measured |",
                 "|---" * (8 + adjusted) + "|"]
        for c, p, a in zip(self.cases, self.predicted, self.actual):
            lines.append(f"| {c.model} | {c.format} | {c.rtn_displacement_norm:.4g} | {c.basin_radius:.4g} | "
                         f"{c.score:.3f} | " + (f"{c.control_gain:+.4f} | " if adjusted else "")
                         + f"{c.gap:+.4f} | {_verdict(p)} | {_verdict(a)} |")
        lines += ["", f"Spearman(score, gap) = {rho_text}",
                  f"threshold rule accuracy = {self.accuracy:.1%} over {len(self.cases)} cases "
                  f"{self.confusion}"]
        return "\n".join(lines)

    def to_record(self) -> StoreRecord:
        """One point per case (norm, radius, score, NLLs, gap, predicted, measured); labels as a table."""
        rows = {"rtn_displacement_norm": np.array([c.rtn_displacement_norm for c in self.cases]),
                "basin_radius": np.array([c.basin_radius for c in self.cases]),
                "score": self.scores, "nll_gptq": np.array([c.nll_gptq for c in self.cases]),
                "nll_qaft": np.array([c.nll_qaft for c in self.cases]),
                "control_gain": np.array([c.control_gain for c in self.cases]), "gap": self.gaps,
                **{name: np.array([getattr(c, name) for c in self.cases]) for name in BASELINE_INPUTS},
                "predicted": self.predicted, "actual": self.actual}
        rho = self.rank_correlation
        provenance = {"kind": "ptq_difficulty_prediction", "score": "||w_RTN - w0|| / R(w0)",
                      "score_threshold": self.score_threshold, "gap_threshold": self.gap_threshold,
                      "gap": "NLL(GPTQ) - NLL(QAFT) - control_gain, nats/token", "accuracy": self.accuracy,
                      "confusion": self.confusion, "rank_correlation": rho.to_dict() if rho else None}
        tables = {"cases": {"model": [c.model for c in self.cases], "format": [c.format for c in self.cases]}}
        return StoreRecord(provenance, rows, {}, tables)

    def to_store(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_record` to a new HDF5 store at ``path``; returns the path."""
        return write_record(path, self.to_record())

    @classmethod
    def from_store(cls, path: str | os.PathLike) -> PredictorEvaluation:
        """Read an evaluation written by :meth:`to_store`."""
        data = read_store(path)
        prov, a = data.provenance, data.arrays
        if prov.get("kind") != "ptq_difficulty_prediction":
            raise PredictionError(f"{path} holds a {prov.get('kind')!r} run, not a predictor evaluation")
        names = data.table("cases")
        cases = tuple(PredictionCase(str(m), str(f), float(a["rtn_displacement_norm"][i]),
                                     float(a["basin_radius"][i]), float(a["nll_gptq"][i]),
                                     float(a["nll_qaft"][i]),
                                     float(a["control_gain"][i]) if "control_gain" in a else 0.0,
                                     **{name: _stored(a, name, i) for name in BASELINE_INPUTS})
                      for i, (m, f) in enumerate(zip(names["model"], names["format"])))
        rho = Interval(**prov["rank_correlation"]) if prov["rank_correlation"] else None
        return cls(cases, prov["score_threshold"], prov["gap_threshold"], rho)


def _stored(arrays: Mapping[str, np.ndarray], name: str, i: int) -> float:
    """A baseline input read back (``math.nan`` itself where it was not measured, so equal cases compare
    equal)."""
    value = float(arrays[name][i]) if name in arrays else math.nan
    return value if math.isfinite(value) else math.nan


def _verdict(far_behind: bool) -> str:
    return "behind" if far_behind else "close"


def evaluate_predictor(
    cases: Sequence[PredictionCase],
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    gap_threshold: float = DEFAULT_GAP_THRESHOLD,
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PredictorEvaluation:
    """Spearman(score, gap) over the cases and the accuracy of the rule ``score > score_threshold`` against
    ``gap > gap_threshold`` (see the module docstring).

    Raises:
        PredictionError: no cases, a case that is not a :class:`PredictionCase`, duplicate (model, format)
            cases, or thresholds / interval settings out of range; before any computation.
    """
    cases = tuple(cases)
    if not cases:
        raise PredictionError("evaluate_predictor needs at least one case")
    for case in cases:
        if not isinstance(case, PredictionCase):
            raise PredictionError(f"cases must be PredictionCase objects, got a {type(case).__name__}")
    keys = [(c.model, c.format) for c in cases]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise PredictionError(f"duplicate cases (model, format): {duplicates}")
    for name, value in (("score_threshold", score_threshold), ("gap_threshold", gap_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PredictionError(f"{name} must be a finite number, got {value!r}")
    check_interval_settings(level, n_resamples)
    scores, gaps = np.array([c.score for c in cases]), np.array([c.gap for c in cases])
    defined = len(cases) >= MIN_PAIRS and np.ptp(scores) > 0 and np.ptp(gaps) > 0
    rho = (rank_correlation(scores, gaps, level=level, n_resamples=n_resamples, seed=seed, unit="cases")
           if defined else None)
    return PredictorEvaluation(cases, float(score_threshold), float(gap_threshold), rho)
