"""Intervals against their promises: coverage of a known mean, paired versus unpaired width, closed forms,
clear errors and seeded determinism. Synthetic data only (numpy, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from landscape.stats import (
    Interval,
    StatsError,
    contrast_interval,
    control_adjusted_gap,
    difference_interval,
    mean_t_interval,
    nll_difference_interval,
    nll_interval,
    normal_interval,
    quantile_interval,
    quantile_summary,
    token_mean_interval,
)

TRUE_NLL = 2.8  # nats/token of the synthetic "text"


def synthetic_segments(rng: np.random.Generator, n_segments: int = 24, true_mean: float = TRUE_NLL):
    """Per-segment NLL sums and token counts whose token-mean has expectation ``true_mean``.

    Segments differ in length (64-256 scored tokens) and in difficulty (a per-segment offset, sd 0.3 nats,
    mean 0, independent of length); token NLLs within a segment are Gamma distributed (skewed, as real
    token losses are).
    """
    tokens = rng.integers(64, 257, size=n_segments)
    difficulty = true_mean + rng.normal(0.0, 0.3, size=n_segments)
    sums = np.array([rng.gamma(shape=2.0, scale=d / 2.0, size=n).sum() for d, n in zip(difficulty, tokens)])
    return sums, tokens


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_interval_covers_the_true_mean_at_about_its_nominal_rate(method):
    trials, covered = 200, 0
    for trial in range(trials):
        sums, tokens = synthetic_segments(np.random.default_rng(1000 + trial))
        interval = token_mean_interval(sums, tokens, level=0.95, method=method, n_resamples=1000, seed=trial)
        covered += interval.contains(TRUE_NLL)
    assert 0.90 <= covered / trials <= 0.99, f"{method}: coverage {covered / trials:.3f} over {trials} trials"


def test_interval_value_is_the_ratio_of_sums_and_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    sums, tokens = synthetic_segments(rng, n_segments=400)
    interval = token_mean_interval(sums, tokens, n_resamples=4000, seed=1)
    assert interval.value == pytest.approx(sums.sum() / tokens.sum(), rel=1e-15)
    # Delta method (ratio estimator) standard error: sqrt(sum((s_i - R n_i)^2) / n / (n - 1)) / mean(n_i).
    n, ratio = len(sums), sums.sum() / tokens.sum()
    stderr = np.sqrt(np.sum((sums - ratio * tokens) ** 2) / (n * (n - 1))) / tokens.mean()
    half = scipy_stats.norm.ppf(0.975) * stderr
    assert interval.low == pytest.approx(ratio - half, abs=0.1 * half)
    assert interval.high == pytest.approx(ratio + half, abs=0.1 * half)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_models():
    rng = np.random.default_rng(3)
    sums_a, tokens = synthetic_segments(rng)
    # Model B: model A's per-segment losses plus a small shift and noise -> strongly positively correlated.
    sums_b = sums_a + tokens * (0.05 + rng.normal(0.0, 0.01, size=len(tokens)))
    paired = difference_interval(sums_a, tokens, sums_b, tokens, paired=True, seed=0)
    unpaired = difference_interval(sums_a, tokens, sums_b, tokens, paired=False, seed=0)
    expected = sums_b.sum() / tokens.sum() - sums_a.sum() / tokens.sum()
    assert paired.value == pytest.approx(expected, rel=1e-12) and unpaired.value == paired.value
    assert paired.width < 0.2 * unpaired.width
    assert paired.low > 0  # the paired interval resolves the shift; the unpaired one does not
    assert unpaired.low < 0 < unpaired.high
    assert paired.method == "paired bootstrap" and unpaired.method == "unpaired bootstrap"
    bca = difference_interval(sums_a, tokens, sums_b, tokens, paired=True, method="bca", seed=0)
    assert bca.contains(expected) and bca.method == "paired BCa bootstrap"


def test_intervals_from_nll_results_and_their_conventions():
    objectives = pytest.importorskip("landscape.objectives")
    rng = np.random.default_rng(5)
    sums, tokens = synthetic_segments(rng, n_segments=12)

    def result(segment_sums, data_hash="abc"):
        convention = objectives.NLLConvention("m", "wiki", "heldout", data_hash, 256, 256, len(tokens),
                                              int(tokens.sum()))
        return objectives.NLLResult(float(segment_sums.sum() / tokens.sum()), segment_sums, tokens,
                                    convention)

    a, b = result(sums), result(sums * 1.01)
    assert nll_interval(a, seed=2) == token_mean_interval(sums, tokens, seed=2)
    assert nll_difference_interval(a, b).value == pytest.approx(b.value - a.value, rel=1e-12)
    with pytest.raises(StatsError, match="same data"):
        nll_difference_interval(a, result(sums, data_hash="other"))


def test_quantiles_and_t_interval_against_closed_forms():
    values = np.array([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0])
    summary = quantile_summary(values, probs=(0.0, 0.5, 1.0))
    assert summary[0.5] == 3.0 and summary[0.0] == 1.0 and summary[1.0] == 9.0  # median of 7 sorted values
    assert summary.mean == pytest.approx(values.mean()) and summary.n == 7
    median = quantile_interval(values, 0.5, seed=0)
    assert median.value == 3.0 and values.min() <= median.low <= 3.0 <= median.high <= values.max()

    seeds = np.array([2.79, 2.81, 2.80, 2.84, 2.77])
    t = mean_t_interval(seeds)
    half = 2.7764451051977987 * seeds.std(ddof=1) / np.sqrt(5)  # t_{0.975, 4}
    assert (t.low, t.high) == pytest.approx((seeds.mean() - half, seeds.mean() + half), rel=1e-12)
    assert t.n_resamples == 0 and t.unit == "seeds"
    hits = sum(mean_t_interval(np.random.default_rng(s).normal(1.0, 2.0, size=4)).contains(1.0)
               for s in range(400))
    assert 0.92 <= hits / 400 <= 0.98
    normal = normal_interval(10.0, 2.0, level=0.95, n_units=10, unit="probe vectors")
    assert (normal.low, normal.high) == pytest.approx((10 - 3.919927969, 10 + 3.919927969), rel=1e-9)


def test_fewer_than_two_segments_and_bad_settings_are_clear_errors():
    with pytest.raises(StatsError, match="at least 2"):
        token_mean_interval([5.0], [3])
    with pytest.raises(StatsError, match="at least 2"):
        mean_t_interval([1.0])
    with pytest.raises(StatsError, match="one of each per segment"):
        token_mean_interval([1.0, 2.0, 3.0], [1, 2])
    with pytest.raises(StatsError, match="> 0"):
        token_mean_interval([1.0, 2.0], [1, 0])
    with pytest.raises(StatsError, match="level"):
        token_mean_interval([1.0, 2.0], [1, 1], level=95)
    with pytest.raises(StatsError, match="method"):
        token_mean_interval([1.0, 2.0], [1, 1], method="studentized")
    with pytest.raises(StatsError, match="non-finite"):
        token_mean_interval([1.0, float("nan")], [1, 1])
    with pytest.raises(StatsError, match="same segments"):
        difference_interval([1.0, 2.0], [1, 1], [1.0, 2.0], [1, 2], paired=True)
    with pytest.raises(StatsError, match="'percentile' only"):
        difference_interval([1.0, 2.0], [1, 1], [1.0, 2.0], [1, 1], paired=False, method="bca")


def test_same_seed_gives_identical_intervals_and_other_seeds_differ():
    sums, tokens = synthetic_segments(np.random.default_rng(9))
    for method in ("percentile", "bca"):
        first = token_mean_interval(sums, tokens, method=method, seed=7)
        assert first == token_mean_interval(sums, tokens, method=method, seed=7)  # bit-identical bounds
        other_seed = token_mean_interval(sums, tokens, method=method, seed=8)
        assert (first.low, first.high) != (other_seed.low, other_seed.high)


def test_printed_form_and_record():
    interval = Interval(2.7914, 2.7543, 2.8291, 0.95, "bootstrap", 2000, 24)
    assert str(interval) == "2.791 [2.754, 2.829] (95 % bootstrap over 24 segments)"
    assert str(Interval(2.885, 2.788, 2.98, 0.9, "paired bootstrap", 500, 12)) == \
        "2.885 [2.788, 2.980] (90 % paired bootstrap over 12 segments)"
    assert str(Interval(1.25e-5, -3e-6, 2.5e-5, 0.95, "bootstrap", 500, 4, "batches")) == \
        "1.250e-05 [-3.000e-06, 2.500e-05] (95 % bootstrap over 4 batches)"
    record = interval.to_dict()
    assert json.loads(json.dumps(record)) == record and Interval(**record) == interval
    summary = quantile_summary([1.0, 2.0, 3.0], probs=(0.5,))
    assert json.dumps(summary.to_dict()) and "q50 2" in str(summary)


def test_contrast_of_two_models_is_the_paired_difference_and_its_value_a_closed_form():
    rng = np.random.default_rng(3)
    counts = rng.integers(50, 200, size=24).astype(float)
    a, b, c = (counts * (3.0 + rng.normal(0, 0.3, size=24)) for _ in range(3))
    pair = contrast_interval([a, b], counts, [-1.0, 1.0])
    reference = difference_interval(a, counts, b, counts, paired=True)
    assert (pair.value, pair.low,
            pair.high) == pytest.approx((reference.value, reference.low, reference.high),
                                        abs=1e-12)
    three = contrast_interval([a, b, c], counts, [0.5, 2.0, -1.0])
    assert three.value == pytest.approx(0.5 * a.sum() / counts.sum() + 2 * b.sum() / counts.sum()
                                        - c.sum() / counts.sum())
    assert three.low < three.value < three.high and three.method == "paired bootstrap"
    with pytest.raises(StatsError, match="one coefficient per model: got 2 models and 3 coefficients"):
        contrast_interval([a, b], counts, [1.0, -1.0, 0.0])
    with pytest.raises(StatsError, match=r"nll_sums\[1\] has 23 entries but token_counts has 24"):
        contrast_interval([a, b[:-1]], counts, [1.0, -1.0])


def test_control_adjusted_gap_subtracts_the_adaptation_and_averages_seeds():
    rng = np.random.default_rng(4)
    counts = np.full(16, 255.0)
    fp32, gptq, control = (counts * m + rng.normal(0, 5, 16) for m in (3.0, 4.5, 2.7))
    qaft = [counts * 3.9 + rng.normal(0, 5, 16) for _ in range(3)]
    gap = control_adjusted_gap("int3", "wiki", gptq, qaft, fp32, [control], counts)
    mean_qaft = np.mean([q.sum() for q in qaft]) / counts.sum()
    assert gap.advantage.value == pytest.approx(gptq.sum() / counts.sum() - mean_qaft)
    assert gap.adaptation.value == pytest.approx((fp32.sum() - control.sum()) / counts.sum())
    assert gap.remaining.value == pytest.approx(gap.advantage.value - gap.adaptation.value)
    assert gap.remaining.value == pytest.approx(0.6 - 0.3, abs=0.05)
    assert (gap.remaining.low > 0
            and "remains after the control (3 seeds of QAFT and 1 of the control" in gap.sentence())
    same = control_adjusted_gap("int3", "wiki", gptq, [qaft[0]] * 2, fp32, [control], counts)
    one = control_adjusted_gap("int3", "wiki", gptq, [qaft[0]], fp32, [control], counts)
    assert same.remaining.value == pytest.approx(one.remaining.value)
    null = control_adjusted_gap("int3", "wiki", gptq, [gptq], fp32, [fp32], counts)
    assert (null.remaining.low <= 0 <= null.remaining.high
            and "no advantage beyond adaptation" in null.sentence())
    with pytest.raises(StatsError, match="at least one QAFT and one control run, got 0 and 1"):
        control_adjusted_gap("int3", "wiki", gptq, [], fp32, [control], counts)
