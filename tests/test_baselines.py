"""The PTQ-difficulty score against baseline predictors (issue #22 item 4), each checked against an
independent computation: RTN's SQNR by hand, leave-one-out by a hand loop over scipy's Spearman, and the
paired difference of correlations on cases built to separate them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from conftest import tiny_model

from landscape.studies.baselines import (
    RTNFeatures,
    compare_predictors,
    leave_one_out,
    rtn_features,
    with_features,
)
from landscape.studies.predict import PredictionCase, PredictionError
from landscape.weights import Base, quantizable_layers, weight_matrix


def hand_rtn_int4(w: np.ndarray) -> np.ndarray:
    """Per-row asymmetric min-max 4-bit rounding, the range widened to include 0, written out row by row."""
    out = np.empty_like(w)
    for i, row in enumerate(w):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        scale = (hi - lo) / 15 if hi > lo else 1.0
        zero = round(-lo / scale)
        out[i] = scale * (np.clip(np.round(row / scale + zero), 0, 15) - zero)
    return out


def test_rtn_features_equal_a_hand_computation():
    model = tiny_model("llama")
    features = rtn_features(Base(model, "tiny"), "int4")
    sqnr, w0_sq, d_sq = [], 0.0, 0.0
    for module in quantizable_layers(model).values():
        w = weight_matrix(module).detach().double().numpy()
        d = hand_rtn_int4(w) - w
        sqnr.append(10 * math.log10((w ** 2).sum() / (d ** 2).sum()))
        w0_sq, d_sq = w0_sq + (w ** 2).sum(), d_sq + (d ** 2).sum()
    assert features.mean_sqnr_db == pytest.approx(np.mean(sqnr), rel=1e-5)
    assert features.weights_norm == pytest.approx(math.sqrt(w0_sq), rel=1e-6)
    assert features.rtn_norm == pytest.approx(math.sqrt(d_sq), rel=1e-5)


def cases(n_models: int = 3, formats: tuple[str, ...] = ("int4", "int3", "int2"), seed: int = 0):
    """Cases whose gap rises exactly with the score; SQNR is unrelated noise, NLL(w0) a per-model constant."""
    rng = np.random.default_rng(seed)
    out = []
    for m in range(n_models):
        for f, fmt in enumerate(formats):
            norm, radius = 10.0 * (f + 1), 5.0 + m
            score = norm / radius
            out.append(with_features(PredictionCase(f"m{m}", fmt, norm, radius, 3.0 + score ** 2, 3.0),
                                     RTNFeatures(float(rng.normal(10, 3)), 100.0 * (m + 1), norm), 3.0 + m))
    return out


def test_leave_one_out_equals_a_hand_loop():
    x, y = np.array([1.0, 3, 2, 5, 4, 7, 6]), np.array([2.0, 1, 4, 3, 6, 5, 8])
    groups = ["a", "a", "b", "b", "c", "c", "c"]
    expected = {}
    for g in "abc":
        keep = [i for i, h in enumerate(groups) if h != g]
        expected[g] = scipy.stats.spearmanr(x[keep], y[keep]).statistic
    got = leave_one_out(x, y, groups)
    assert got == pytest.approx(expected)
    assert math.isnan(leave_one_out(x[:4], y[:4], ["a", "a", "b", "b"])["a"])  # two cases left: undefined


def test_the_score_wins_where_it_orders_the_gaps_and_the_difference_is_paired():
    comparison = compare_predictors(cases(), n_resamples=500)
    by_name = {c.name: c for c in comparison.candidates}
    assert by_name["score"].rank_correlation.value == pytest.approx(1.0)
    assert comparison.best() == "score"
    sqnr = by_name["neg_sqnr"]
    assert sqnr.versus_score.value == pytest.approx(1.0 - sqnr.rank_correlation.value)
    assert sqnr.versus_score.low > 0  # noise loses to an exact ordering in every resample's majority
    # leave-one-model-out of the score: still an exact ordering without any one model
    assert all(v == pytest.approx(1.0) for v in by_name["score"].leave_one_model_out.values())
    assert set(by_name["score"].leave_one_format_out) == {"int4", "int3", "int2"}
    assert "largest correlation: score" in comparison.markdown()


def test_bad_cases_are_refused_before_any_resampling():
    with pytest.raises(PredictionError, match="at least 3 cases"):
        compare_predictors(cases()[:2])
    bare = [PredictionCase("m", f, 1.0 + i, 2.0, 3.0 + i, 3.0) for i, f in enumerate(["a", "b", "c"])]
    with pytest.raises(PredictionError, match="lack RTN's SQNR"):
        compare_predictors(bare)
    same = cases(n_models=1)
    with pytest.raises(PredictionError, match="nll_w0"):  # one model: NLL(w0) is constant
        compare_predictors(same)
