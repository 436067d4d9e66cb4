"""PTQ-difficulty predictor: cases read from quant-table rows, the ranking metric (Spearman of score vs gap)
and the threshold rule's accuracy against hand computations on a synthetic table, bad input, store round
trip."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from landscape.studies.predict import (
    PredictionCase,
    PredictionError,
    PredictorEvaluation,
    cases_from_quant_table,
    difficulty_score,
    evaluate_predictor,
    predicts_gptq_behind,
)
from landscape.studies.quant_table import QuantTable


def row(method: str, fmt: str, norm: float, wiki: float, seed: int = 0, act_bits: int = 0) -> dict:
    """A row shaped like landscape.studies.quant_table.read_quant_table's."""
    return {"label": f"{method} {fmt}", "method": method, "format": fmt, "seed": seed, "act_bits": act_bits,
            "displacement_norm": norm, "layer_mse_sum": 0.0, "seconds": 0.0, "bits_per_weight": 4.0,
            "nll": {"wiki": wiki, "sotu": wiki + 1.0}}


def synthetic_table(model: str, formats: dict[str, tuple[float, float, float, float]]) -> QuantTable:
    """formats: name -> (RTN norm, NLL GPTQ, NLL QAFT seed 0, NLL QAFT seed 1)."""
    rows = [row("fp32", "", 0.0, 3.0)]
    for fmt, (norm, gptq, qaft0, qaft1) in formats.items():
        rows += [row("rtn", fmt, norm, gptq + 1.0), row("gptq", fmt, 1.2 * norm, gptq),
                 row("qaft", fmt, norm, qaft0, seed=0), row("qaft", fmt, norm, qaft1, seed=1),
                 row("gptq", fmt, 1.2 * norm, gptq + 5.0, act_bits=8)]  # W+A variant: ignored
    return QuantTable(rows, {"model": model, "protocol": {"eval_corpora": ["wiki", "sotu"]}}, True)


def test_cases_are_read_from_quant_table_rows():
    table = synthetic_table("m1", {"int4": (50.0, 3.30, 3.20, 3.22), "int3": (120.0, 5.00, 4.40, 4.60)})
    cases = cases_from_quant_table(table, basin_radius=100.0)
    assert [(c.model, c.format) for c in cases] == [("m1", "int4"), ("m1", "int3")]
    int3 = cases[1]
    assert int3.rtn_displacement_norm == 120.0 and int3.nll_gptq == 5.00
    assert int3.nll_qaft == pytest.approx((4.40 + 4.60) / 2) and int3.gap == pytest.approx(5.00 - 4.50)
    assert int3.score == pytest.approx(1.2) and cases[0].score == pytest.approx(0.5)
    sotu = cases_from_quant_table(table, 100.0, corpus="sotu")
    assert sotu[0].nll_gptq == pytest.approx(4.30)
    with pytest.raises(PredictionError, match="corpus 'c4'"):
        cases_from_quant_table(table, 100.0, corpus="c4")
    partial = QuantTable([r for r in table.rows if not (r["format"] == "int3" and r["method"] == "qaft")],
                         table.provenance, False)
    with pytest.warns(UserWarning, match=r"\['int3'\]"):
        assert [c.format for c in cases_from_quant_table(partial, 100.0)] == ["int4"]
    with pytest.raises(PredictionError, match="model="):
        cases_from_quant_table(table.rows, 100.0)


def test_ranking_metric_and_threshold_accuracy_equal_hand_computations():
    # two models x three formats; the scores and gaps have no ties, so rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    tables = {"small": (80.0, {"int4": (40.0, 3.40, 3.35, 3.37), "int3": (100.0, 4.10, 3.80, 3.84),
                               "int2": (300.0, 9.00, 6.00, 6.20)}),
              "large": (200.0, {"int4": (60.0, 3.00, 2.99, 2.99), "int3": (180.0, 3.50, 3.45, 3.43),
                                "int2": (500.0, 6.00, 4.00, 4.40)})}
    cases = [c for model, (radius, formats) in tables.items()
             for c in cases_from_quant_table(synthetic_table(model, formats), radius)]
    evaluation = evaluate_predictor(cases, gap_threshold=0.1, n_resamples=300)

    scores = [40 / 80, 100 / 80, 300 / 80, 60 / 200, 180 / 200, 500 / 200]  # 0.5 1.25 3.75 0.3 0.9 2.5
    # .04 .28 2.9 .01 .06 1.8
    gaps = [3.40 - 3.36, 4.10 - 3.82, 9.00 - 6.10, 3.00 - 2.99, 3.50 - 3.44, 6.00 - 4.20]
    np.testing.assert_allclose(evaluation.scores, scores)
    np.testing.assert_allclose(evaluation.gaps, gaps, atol=1e-12)
    score_ranks, gap_ranks = [2, 4, 6, 1, 3, 5], [2, 4, 6, 1, 3, 5]
    d2 = sum((a - b) ** 2 for a, b in zip(score_ranks, gap_ranks))
    assert evaluation.rank_correlation.value == pytest.approx(1 - 6 * d2 / (6 * 35))  # = 1: a perfect ranking
    # rule: score > 1 -> [F T T F F T]; measured gap > 0.1 -> [F T T F F T]: all right
    assert evaluation.accuracy == 1.0
    assert evaluation.confusion == {"true_positive": 3, "false_positive": 0, "true_negative": 3,
                                    "false_negative": 0}

    # move one case: large int3 now far behind (gap 0.26) though its score 0.9 says close
    moved = [PredictionCase(c.model, c.format, c.rtn_displacement_norm, c.basin_radius,
                            c.nll_gptq + (0.20 if (c.model, c.format) == ("large", "int3") else 0.0),
                            c.nll_qaft)
             for c in cases]
    again = evaluate_predictor(moved, gap_threshold=0.1, n_resamples=300)
    gap_ranks = [2, 4, 6, 1, 3, 5]  # gaps .04 .28 2.9 .01 .26 1.8 -> ranks 2 4 6 1 3 5: ranking unchanged
    assert again.rank_correlation.value == pytest.approx(1.0)
    assert again.accuracy == pytest.approx(5 / 6)
    assert again.confusion["false_negative"] == 1 and again.confusion["true_positive"] == 3
    strict = evaluate_predictor(moved, score_threshold=0.8, gap_threshold=0.1, n_resamples=300)
    assert strict.accuracy == 1.0  # 0.9 > 0.8: the lower threshold catches it
    swapped = [PredictionCase(c.model, c.format, c.rtn_displacement_norm, c.basin_radius,
                              c.nll_qaft + g, c.nll_qaft)
               for c, g in zip(cases, [0.04, 2.9, 0.28, 0.01, 0.06, 1.8])]
    rho = evaluate_predictor(swapped, n_resamples=300).rank_correlation.value
    gap_ranks = [2, 6, 4, 1, 3, 5]
    d2 = sum((a - b) ** 2 for a, b in zip(score_ranks, gap_ranks))
    assert rho == pytest.approx(1 - 6 * d2 / (6 * 35)) and rho == pytest.approx(
        scipy_stats.spearmanr([c.score for c in swapped], [c.gap for c in swapped]).statistic)


def test_score_rule_and_bad_input():
    assert difficulty_score(150.0, 100.0) == 1.5 and difficulty_score(10.0, float("inf")) == 0.0
    assert (predicts_gptq_behind(1.5) and not predicts_gptq_behind(1.0)
            and predicts_gptq_behind(0.9, threshold=0.5))
    for norm, radius in ((-1.0, 10.0), (float("nan"), 10.0), (1.0, 0.0), (1.0, -2.0)):
        with pytest.raises(PredictionError):
            difficulty_score(norm, radius)
    case = PredictionCase("m", "int4", 10.0, 20.0, 3.0, 2.95)
    with pytest.raises(PredictionError, match="duplicate"):
        evaluate_predictor([case, case])
    with pytest.raises(PredictionError, match="at least one"):
        evaluate_predictor([])
    with pytest.raises(PredictionError, match="gap_threshold"):
        evaluate_predictor([case], gap_threshold=float("nan"))
    with pytest.raises(PredictionError, match="nll_qaft"):
        PredictionCase("m", "int4", 10.0, 20.0, 3.0, float("inf"))
    single = evaluate_predictor([case])
    assert single.rank_correlation is None and single.accuracy == 1.0  # score 0.5 <= 1 and gap 0.05 <= 0.1


def test_store_round_trip(tmp_path):
    cases = [PredictionCase("m", f"int{b}", 10.0 * (9 - b), 30.0, 3.0 + 1 / b, 3.0 + 0.5 / b)
             for b in (2, 3, 4, 5)]
    evaluation = evaluate_predictor(cases, n_resamples=300)
    read = PredictorEvaluation.from_store(evaluation.to_store(tmp_path / "predict.h5"))
    assert read == evaluation and read.markdown() == evaluation.markdown()
    np.testing.assert_array_equal(read.scores, evaluation.scores)
    assert read.rank_correlation == evaluation.rank_correlation and "| m | int3 |" in read.markdown()


def test_control_adjusted_gaps_subtract_the_controls_gain(tmp_path):
    table = synthetic_table("m1", {"int4": (50.0, 3.30, 3.20, 3.22), "int3": (120.0, 5.00, 4.40, 4.60)})
    with pytest.raises(PredictionError, match="fp-finetune"):
        cases_from_quant_table(table, 100.0, adjust_for_control=True)
    rows = table.rows + [row("fp-finetune", "int4", 1.0, 2.70, seed=0),
                         row("fp-finetune", "int4", 1.0, 2.80, seed=1)]
    adjusted = QuantTable(rows, table.provenance, True)
    cases = cases_from_quant_table(adjusted, 100.0, adjust_for_control=True)
    gain = 3.0 - (2.70 + 2.80) / 2  # fp32 row minus the mean control
    assert [c.control_gain for c in cases] == pytest.approx([gain, gain])
    assert (cases[1].gap == pytest.approx(5.00 - 4.50 - gain)
            and cases[0].gap == pytest.approx(3.30 - 3.21 - gain))
    assert ([c.gap for c in cases_from_quant_table(adjusted, 100.0)]
            == pytest.approx([3.30 - 3.21, 5.00 - 4.50]))
    evaluation = evaluate_predictor(cases + [PredictionCase("m2", "int4", 10.0, 20.0, 3.1, 3.0, 0.05)],
                                    n_resamples=200)
    assert "control gain" in evaluation.markdown() and "| +0.2500 |" in evaluation.markdown()
    np.testing.assert_allclose(evaluation.gaps, [c.gap for c in evaluation.cases])
    assert PredictorEvaluation.from_store(evaluation.to_store(tmp_path / "p.h5")) == evaluation
