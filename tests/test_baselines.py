"""The PTQ-difficulty score against baseline predictors (issue #22 item 4), each checked against an
independent computation: RTN's SQNR by hand, leave-one-out by a hand loop over scipy's Spearman, and the
paired difference of correlations on cases built to separate them."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
from conftest import tiny_model

from landscape.store import read_store
from landscape.studies.baselines import (
    RTNFeatures,
    compare_predictors,
    leave_one_out,
    measure_rtn_features,
    model_cases,
    read_rtn_features,
    rtn_features,
    with_features,
)
from landscape.studies.predict import PredictionCase, PredictionError
from landscape.studies.quant_table import QuantTable
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


def test_within_model_correlations_equal_a_hand_loop():
    comparison = compare_predictors(cases(n_models=3, formats=("int4", "int3", "int2", "int5")),
                                    n_resamples=100)
    by_name = {c.name: c for c in comparison.candidates}
    for name in ("score", "neg_sqnr"):
        for m in ("m0", "m1", "m2"):
            mine = [c for c in comparison.cases if c.model == m]
            x = [c.score if name == "score" else -c.rtn_sqnr_db for c in mine]
            assert by_name[name].within_model[m] == pytest.approx(
                scipy.stats.spearmanr(x, [c.gap for c in mine]).statistic)
    assert all(math.isnan(v) for v in by_name["nll_w0"].within_model.values())  # constant within a model
    assert "m0 +1.00" in comparison.markdown()


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


def test_rtn_features_store_holds_each_format_and_refuses_bad_formats_before_writing(tmp_path):
    model = tiny_model("gpt2")
    path = measure_rtn_features(model, ["int4", "int3-g16", "mxint4-32"], tmp_path / "f.h5",
                                {"model": "tiny"})
    stored = read_rtn_features(read_store(path))
    assert list(stored) == ["int4", "int3-g16", "mxint4-32"]
    for fmt, features in stored.items():
        assert features == rtn_features(model, fmt)  # the same computation, stored exactly (float64)
    for bad, match in ((["int4", "int9"], "int9"), (["int4", "int4"], "distinct")):
        with pytest.raises(ValueError, match=match):
            measure_rtn_features(model, bad, tmp_path / "bad.h5")
        assert not list(tmp_path.glob("bad*"))
    with pytest.raises(PredictionError, match="rtn_features"):
        read_rtn_features(dataclasses.replace(read_store(path), provenance={"kind": "model_facts"}))


def table(model: str, rows: list[tuple[str, str, float, float]]) -> QuantTable:
    """A quant table of ``(method, format, wiki NLL, displacement norm)`` rows with an fp32 row at 3.0."""
    out = [{"method": "fp32", "format": "", "act_bits": None, "displacement_norm": 0.0, "nll": {"wiki": 3.0}}]
    out += [{"method": m, "format": f, "act_bits": None, "displacement_norm": d, "nll": {"wiki": nll}}
            for m, f, nll, d in rows]
    return QuantTable(out, {"model": model}, True)


def test_model_cases_take_a_format_once_check_the_rtn_norm_and_adjust_for_the_control():
    first = table("m", [("rtn", "int4", 3.5, 2.0), ("gptq", "int4", 3.3, 1.8), ("qaft", "int4", 3.1, 2.5),
                        ("fp-finetune", "", 2.9, 1.0)])
    second = table("m", [("rtn", "int4", 9.0, 2.0), ("gptq", "int4", 9.0, 1.8), ("qaft", "int4", 3.0, 2.5),
                         ("rtn", "int3", 4.0, 4.0), ("gptq", "int3", 3.6, 3.0), ("qaft", "int3", 3.2, 3.5),
                         ("fp-finetune", "", 2.8, 1.0)])
    features = {"int4": RTNFeatures(20.0, 50.0, 2.0), "int3": RTNFeatures(14.0, 50.0, 4.0)}
    raw = {c.format: c for c in model_cases([first, second], 8.0, features)}
    assert raw["int4"].gap == pytest.approx(3.3 - 3.1)  # from the first table, not the second's 9.0
    assert raw["int3"].gap == pytest.approx(3.6 - 3.2)
    assert raw["int3"].score == pytest.approx(4.0 / 8.0) and raw["int3"].rtn_sqnr_db == 14.0
    assert raw["int3"].nll_w0 == 3.0 and raw["int3"].weights_norm == 50.0
    adjusted = {c.format: c for c in model_cases([first, second], 8.0, features, adjust_for_control=True)}
    assert adjusted["int4"].gap == pytest.approx(0.2 - (3.0 - 2.9))  # each table's own control
    assert adjusted["int3"].gap == pytest.approx(0.4 - (3.0 - 2.8))
    with pytest.raises(PredictionError, match="not the same weights"):
        model_cases([first], 8.0, {"int4": RTNFeatures(20.0, 50.0, 2.1)})
    with pytest.raises(PredictionError, match="no RTN features"):
        model_cases([second], 8.0, {"int4": features["int4"]})
