"""Misalignment study: random on-grid roundings lie on the shared grid, are deterministic per seed and reach
the closed-form displacement size; Spearman equals scipy (and its bootstrap a hand loop); groups inside /
outside the basin and by norm bin equal scipy on the subsets; candidates' measurements equal independent
ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model
from scipy import stats as scipy_stats
from test_compare import hand_layer_mse

from landscape.engine.sweep import Execution
from landscape.objectives import nll
from landscape.quant import make_grid, rtn
from landscape.quant.formats import FormatError
from landscape.stats import StatsError, rank_correlation, spearman
from landscape.studies import candidates as candidates_module
from landscape.studies.candidates import (
    CandidateTable,
    MisalignmentError,
    RoundingSpec,
    dither_generator,
    dithered_rounding,
    measure_candidates,
    random_roundings,
)
from landscape.studies.candidates import rounded as stochastic_rounding
from landscape.studies.comparison import ComparisonError
from landscape.studies.misalignment import Misalignment, misalignment, within_format_correlation
from landscape.weights import layer_weights, swapped_weights


@pytest.mark.parametrize("fmt", ["int4", "int3-g16", "int4-sym", "mxint4-16"])
def test_random_roundings_lie_on_the_grid_between_neighbours_and_are_deterministic(arch, fmt):
    model = tiny_model(arch, torch.float64)
    w0 = layer_weights(model)
    first = stochastic_rounding(model, RoundingSpec(fmt, seed=5))
    again = stochastic_rounding(model, RoundingSpec(fmt, seed=5))
    other = stochastic_rounding(model, RoundingSpec(fmt, seed=6))
    assert list(first.weights) == list(w0)
    for name, w in first.weights.items():
        grid = make_grid(w0[name], fmt)
        assert grid.contains(w) and torch.equal(w, again.weights[name])
        step = grid.scale.repeat_interleave(grid.group_size, dim=1)
        # one of the two lattice points around w0 (or the nearest end of the code range): within one step
        assert bool(((w - w0[name]).abs() <= step * (1 + 1e-9)).all())
    assert any(not torch.equal(first.weights[n], other.weights[n]) for n in w0)
    nearest = stochastic_rounding(model, RoundingSpec(fmt, seed=5, fraction=0.0))
    reference = rtn(model, fmt)
    assert all(torch.equal(nearest.weights[n], reference.weights[n]) for n in w0)


def test_fraction_sets_the_displacement_size_as_in_closed_form():
    """With fractional positions p ~ U(0, 1): E[RTN error^2] = s^2/12 and E[stochastic error^2] = s^2/6, so
    mixing a fraction f of stochastic rounding scales the displacement norm by sqrt(1 + f)."""
    model = tiny_model("gpt2", torch.float64)
    w0 = layer_weights(model)

    def norm(result) -> float:
        return math.sqrt(sum(float((result.weights[n] - w0[n]).pow(2).sum()) for n in w0))

    base = norm(rtn(model, "int4"))
    for fraction in (0.5, 1.0):
        ratio = norm(stochastic_rounding(model, RoundingSpec("int4", 0, fraction))) / base
        assert ratio == pytest.approx(math.sqrt(1 + fraction), rel=0.03)


def test_spearman_equals_scipy_and_its_bootstrap_a_hand_loop():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 25).astype(float)  # ties on both sides
    y = x + rng.normal(0, 2, 25).round()
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, rel=1e-12)
    interval = rank_correlation(x, y, n_resamples=300, seed=7)
    index = np.random.default_rng(7).integers(0, 25, size=(300, 25))
    hand = [scipy_stats.spearmanr(x[i], y[i]).statistic for i in index]
    hand = np.array([h for h in hand if np.isfinite(h)])
    low, high = np.quantile(hand, [0.025, 0.975])
    assert interval.value == pytest.approx(scipy_stats.spearmanr(x, y).statistic, rel=1e-12)
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)
    assert rank_correlation(x, y, n_resamples=300, seed=7) == interval  # deterministic per seed
    with pytest.raises(StatsError, match="at least 3"):
        rank_correlation([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(StatsError, match="constant"):
        rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def synthetic_table(norms, mses, nlls) -> CandidateTable:
    n = len(norms)
    return CandidateTable(tuple(f"c{i}" for i in range(n)), ("synthetic",) * n, ("int4",) * n,
                          np.asarray(norms, float), np.asarray(mses, float), np.asarray(nlls, float), 3.0,
                          {"model": "synthetic"})


def test_groups_inside_outside_the_basin_and_bins_equal_scipy_on_the_subsets():
    rng = np.random.default_rng(1)
    norms = np.linspace(1.0, 12.0, 24)
    mses = rng.uniform(0, 1, 24)
    nlls = np.where(norms <= 6.0, 3.0 + mses, 3.0 + rng.uniform(0, 1, 24))  # aligned inside R = 6 only
    study = misalignment(synthetic_table(norms, mses, nlls), 6.0, bins=3, n_resamples=200)
    inside, outside = norms <= 6.0, norms > 6.0
    assert study.inside.n == inside.sum() and study.outside.n == outside.sum() and study.overall.n == 24
    assert study.inside.correlation.value == pytest.approx(1.0)
    assert study.outside.correlation.value == pytest.approx(
        scipy_stats.spearmanr(mses[outside], nlls[outside]).statistic, rel=1e-12)
    assert study.overall.correlation.value == pytest.approx(scipy_stats.spearmanr(mses, nlls).statistic,
                                                            rel=1e-12)
    edges = np.quantile(norms, [0, 1 / 3, 2 / 3, 1])
    assert [g.n for g in study.bins] == [8, 8, 8]
    for k, group in enumerate(study.bins):
        chosen = ((norms >= edges[k]) if k == 0 else (norms > edges[k])) & (norms <= edges[k + 1])
        assert group.correlation.value == pytest.approx(
            scipy_stats.spearmanr(mses[chosen], nlls[chosen]).statistic, rel=1e-12)
    few = misalignment(synthetic_table(norms, mses, nlls), 1.5, bins=[0.0, 6.0, 20.0], n_resamples=200)
    assert few.inside.n == 2 and few.inside.correlation is None and "n/a" in few.markdown()
    with pytest.raises(MisalignmentError, match="basin_radius"):
        misalignment(synthetic_table(norms, mses, nlls), 0.0)
    with pytest.raises(MisalignmentError, match="increasing"):
        misalignment(synthetic_table(norms, mses, nlls), 6.0, bins=[3.0, 1.0])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # constant resamples in the hand loop
def test_within_format_correlations_equal_scipy_per_format_and_a_hand_stratified_bootstrap(tmp_path):
    """Three formats at growing distance, R between the first and the others. Within each format MSE and NLL
    are aligned (int8) or reversed (int4, int3), while across formats both grow with the distance: pooled, the
    correlation is high outside R; within formats it is -1 there."""
    rng = np.random.default_rng(3)
    formats, norms, mses, nlls = [], [], [], []
    for fmt, distance, n, sign in (("int8", 1.0, 5, +1), ("int4", 10.0, 6, -1), ("int3", 20.0, 4, -1)):
        mse = distance * (1 + rng.permutation(n) / 10)
        formats += [fmt] * n
        norms += list(distance * (1 + rng.uniform(0, 0.1, n)))
        mses += list(mse)
        nlls += list(3 + distance + sign * mse / 100)
    n = len(formats)
    table = CandidateTable(tuple(f"c{i}" for i in range(n)), ("synthetic",) * n, tuple(formats),
                           np.array(norms), np.array(mses), np.array(nlls), 3.0, {"model": "synthetic"})
    study = misalignment(table, 5.0, bins=2, n_resamples=300, seed=4)
    w = study.within_format
    assert [f.format for f in w.per_format] == ["int8", "int4", "int3"]  # by median distance
    assert ([f.inside for f in w.per_format] == [True, False, False]
            and [f.n for f in w.per_format] == [5, 6, 4])
    fmts = np.array(formats)
    for f in w.per_format:
        chosen = fmts == f.format
        assert f.correlation.value == pytest.approx(
            scipy_stats.spearmanr(table.layer_mse_sum[chosen], table.nll[chosen]).statistic, rel=1e-12)
        assert f.median_norm == pytest.approx(np.median(table.displacement_norm[chosen]))
    assert w.inside.value == pytest.approx(1.0) and w.outside.value == pytest.approx(-1.0)
    # pooled over int4 and int3, the distance orders both: positive
    assert study.outside.correlation.value > 0.4
    # the stratified bootstrap by hand: per side one generator, formats in order, resampled within each format
    rng_hand = np.random.default_rng(4)
    boot = np.zeros(300)
    for fmt in ("int4", "int3"):
        index = np.flatnonzero(fmts == fmt)
        draws = index[rng_hand.integers(0, len(index), size=(300, len(index)))]
        boot += [scipy_stats.spearmanr(table.layer_mse_sum[d], table.nll[d]).statistic for d in draws]
    boot = boot[np.isfinite(boot)] / 2
    assert (w.outside.low, w.outside.high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])),
                                                            rel=1e-12)
    assert w.outside.n_units == 10 and w.outside.method == "stratified bootstrap"
    # a format with fewer than 3 candidates has no correlation and is left out of its side's mean
    # int3: c11 and c12 only
    few = table.subset(np.array([f != "int3" or i < 13 for i, f in enumerate(formats)]))
    fw = within_format_correlation(few, 5.0, n_resamples=300)
    assert fw.per_format[-1].correlation is None and [f.format for f in fw.side_formats(False)] == ["int4"]
    assert fw.outside.value == pytest.approx(-1.0)
    assert "| mean outside R (int4) |" in misalignment(few, 5.0, n_resamples=300).markdown()
    # stores round-trip it; subsets keep the chosen candidates in order
    read = Misalignment.from_store(study.to_store(tmp_path / "w.h5"))
    assert read.within_format == study.within_format and read.markdown() == study.markdown()
    sub = table.subset(fmts == "int4")
    assert sub.labels == tuple(np.array(table.labels)[fmts == "int4"]) and len(sub) == 6
    np.testing.assert_array_equal(sub.nll, table.nll[fmts == "int4"])
    with pytest.raises(MisalignmentError, match="booleans"):
        table.subset([1, 0])


def test_measured_candidates_equal_independent_measurements_and_round_trip(tmp_path):
    model = tiny_model("gpt2", torch.float64)
    data = random_tokens(4, 16, seed=2)
    specs = random_roundings(["int4", "int3"], seeds=[0, 1], fractions=[0.0, 1.0])
    candidates = {**specs, "rtn int2": rtn(model, "int2")}
    table = measure_candidates(model, candidates, data, execution=Execution(progress=False))
    w0 = layer_weights(model)
    assert table.labels == tuple(candidates) and table.nll_w0 == nll(model, data).value
    for i, (label, candidate) in enumerate(candidates.items()):
        result = stochastic_rounding(model, candidate) if isinstance(candidate, RoundingSpec) else candidate
        flat = np.concatenate([(result.weights[n] - w0[n]).numpy().ravel() for n in result.weights])
        assert table.displacement_norm[i] == pytest.approx(np.linalg.norm(flat), rel=1e-12)
        with swapped_weights(model, result.weights):
            assert table.nll[i] == nll(model, data).value
        if i in (0, len(candidates) - 1):  # hooks are slow-ish: two candidates suffice
            expected = sum(hand_layer_mse(model, data, n, w) for n, w in result.weights.items())
            assert table.layer_mse_sum[i] == pytest.approx(expected, rel=1e-10)
    study = misalignment(table, float(np.median(table.displacement_norm)), bins=2, n_resamples=200)
    path = study.to_store(tmp_path / "mis.h5")
    read = Misalignment.from_store(path)
    assert read.markdown() == study.markdown()
    np.testing.assert_array_equal(read.candidates.nll, table.nll)


def test_bad_candidates_are_refused_before_any_work(monkeypatch, tmp_path):
    model = tiny_model("gpt2", torch.float64)
    data = random_tokens(4, 16)

    def no_work(*args, **kwargs):
        raise AssertionError("evaluation started before the inputs were checked")

    monkeypatch.setattr(candidates_module, "nll", no_work)
    foreign = rtn(tiny_model("gpt2", torch.float64, seed=1), "int4")
    with pytest.raises(ComparisonError, match="fingerprint"):
        measure_candidates(model, {"a": RoundingSpec("int4", 0), "b": foreign}, data,
                           execution=Execution(progress=False))
    with pytest.raises(FormatError, match="group size 24"):
        measure_candidates(model, {"a": RoundingSpec("int4-g24", 0)}, data,
                           execution=Execution(progress=False))
    with pytest.raises(MisalignmentError, match="fraction"):
        RoundingSpec("int4", 0, fraction=1.5)
    with pytest.raises(MisalignmentError, match="non-empty"):
        measure_candidates(model, {}, data, execution=Execution(progress=False))
    foreign.save(tmp_path / "foreign")  # a saved result is checked from its metadata, before anything loads
    with pytest.raises(ComparisonError, match="fingerprint"):
        measure_candidates(model, {"a": RoundingSpec("int4", 0), "b": tmp_path / "foreign"}, data,
                           execution=Execution(progress=False))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        measure_candidates(model, {"a": RoundingSpec("int4", 0), "b": tmp_path / "missing"}, data,
                           execution=Execution(progress=False))


def test_a_saved_result_given_by_its_path_measures_as_the_loaded_result(tmp_path):
    model = tiny_model("llama", torch.float64)
    data = random_tokens(4, 16, seed=3)
    result = rtn(model, "int3")
    result.save(tmp_path / "rtn-int3")
    table = measure_candidates(model, {"in memory": result, "saved": str(tmp_path / "rtn-int3")}, data,
                               execution=Execution(progress=False))
    assert table.nll[0] == table.nll[1] and table.layer_mse_sum[0] == table.layer_mse_sum[1]
    assert table.displacement_norm[0] == table.displacement_norm[1] > 0
    assert table.provenance["candidates"]["saved"]["kind"] == "saved quant result"


def test_dithered_rounding_is_on_grid_unbiased_and_rtn_at_zero():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 64, generator=g, dtype=torch.float64)
    grid = make_grid(w0, "int3")
    assert torch.equal(dithered_rounding(w0, grid, 0.0, torch.Generator().manual_seed(1)),
                       grid.round(w0))
    draws = torch.stack([dithered_rounding(w0, grid, 1.0, torch.Generator().manual_seed(s))
                         for s in range(2000)])
    assert all(grid.contains(d) for d in draws[:20])
    # stochastic rounding goes up with probability = fractional part of w0/s + z (inside the code range)
    scale = grid.scale.repeat_interleave(grid.group_size, dim=1)
    x = w0 / scale + grid.zero.repeat_interleave(grid.group_size, dim=1)
    inside = (x > grid.fmt.qmin) & (x < grid.fmt.qmax)
    frac = x - torch.floor(x)
    up = (draws > w0 + 1e-12).double().mean(0)
    tolerance = 4 * torch.sqrt(frac * (1 - frac) / len(draws)) + 1e-3  # 4 binomial standard errors
    assert bool(((up - frac).abs() <= tolerance)[inside].all())
    # seeded: the same (seed, format, layer) gives the same dither, another layer another one
    a = torch.rand(3, generator=dither_generator(0, "int3", "h.0.attn"))
    assert torch.equal(a, torch.rand(3, generator=dither_generator(0, "int3", "h.0.attn")))
    assert not torch.equal(a, torch.rand(3, generator=dither_generator(0, "int3", "h.1.attn")))
