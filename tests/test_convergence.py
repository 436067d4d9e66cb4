"""The convergence sweep (issue 22, item 1): budgets, per-replicate sums, summaries, and the study end to
end on a tiny model against direct measurements."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats
from conftest import saved_tiny_llama

from landscape.curvature import Curvature, DirectionalCurvature, Spectrum
from landscape.studies import convergence as cv


def test_budgets_from_tokens_and_disjoint_groups():
    b = cv.Budgets.from_tokens([64, 256], seq_len=32, replicates=[3, 2])
    assert b.segments == (2, 8) and b.replicates == (3, 2) and b.n_windows == 16
    assert b.tokens(1) == 256
    for i in range(2):
        groups = b.groups(i)
        assert all(len(g) == b.segments[i] for g in groups)
        flat = [w for g in groups for w in g]
        assert len(flat) == len(set(flat))  # disjoint
    assert cv.Budgets.from_tokens([32, 64], 32, [4]).replicates == (4, 4)


@pytest.mark.parametrize("tokens, reps, available, match", [
    ([64, 48], [1], None, "multiples of seq_len=32"),
    ([64, 32], [1], None, "increasing"),
    ([32, 64], [2, 0], None, "replicates must be >= 1"),
    ([32, 64], [1, 2, 3], None, "one replicate count per budget"),
    ([32, 128], [4, 3], 10, "need 12 windows .* has 10"),
])
def test_bad_budgets_are_refused(tokens, reps, available, match):
    with pytest.raises(cv.ConvergenceError, match=match):
        cv.Budgets.from_tokens(tokens, 32, reps, available=available)


def test_group_estimates_are_ratios_of_sums_over_each_replicates_windows():
    rng = np.random.default_rng(0)
    sums, counts = rng.normal(size=12), rng.integers(10, 20, size=12).astype(float)
    b = cv.Budgets(seq_len=16, segments=(1, 3, 6), replicates=(4, 3, 2))
    est = cv.group_estimates(sums, counts, b)
    # by hand: budget 1 (3 windows), replicate 2 = windows 6, 7, 8
    assert est[1][2] == pytest.approx((sums[6] + sums[7] + sums[8]) / (counts[6] + counts[7] + counts[8]))
    assert est[0].tolist() == pytest.approx((sums[:4] / counts[:4]).tolist())
    assert est[2][1] == pytest.approx(sums[6:12].sum() / counts[6:12].sum())
    with pytest.raises(cv.ConvergenceError, match="needs 12"):
        cv.group_estimates(sums[:11], counts[:11], b)


def test_converge_interval_deviation_and_stability_by_hand():
    b = cv.Budgets(seq_len=8, segments=(1, 2, 4), replicates=(3, 3, 2))
    values = [[10.0, 14.0, 6.0], [9.5, 10.6, 10.2], [10.1, 9.9]]
    row = cv.converge("x", values, b, tolerance=0.1)
    assert row.reference == pytest.approx(10.0)
    # Student t interval of budget 1's mean, by scipy directly
    x = np.array(values[1])
    half = scipy.stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3)
    assert (row.budgets[1].interval.low, row.budgets[1].interval.high) == pytest.approx(
        (x.mean() - half, x.mean() + half))
    assert row.budgets[0].deviation == pytest.approx(0.4)  # |6 - 10| / 10
    assert row.budgets[1].deviation == pytest.approx(0.06)
    assert row.stable_from == 1 and row.stable_tokens == 16
    # a larger budget off by more than the tolerance makes the earlier one not count
    late = cv.converge("y", [[10.0, 10.0, 10.0], [8.0, 12.5, 10.0], [10.0, 10.0]], b, tolerance=0.1)
    assert late.stable_from == 2
    never = cv.converge("z", [[1.0] * 3, [1.0] * 3, [1.0, 2.0]], b, tolerance=0.1)
    assert never.stable_from is None and never.stable_tokens is None
    assert cv.converge("one", [[1.0] * 3, [1.0] * 3, [1.0, 1.0]], b).budgets[0].spread == 0.0
    with pytest.raises(cv.ConvergenceError, match="needs 2 finite values"):
        cv.converge("bad", [[1.0] * 3, [1.0] * 3, [1.0, float("nan")]], b)


def test_markdown_says_when_only_the_largest_budget_is_within_tolerance():
    b = cv.Budgets(seq_len=8, segments=(1, 2), replicates=(2, 2))
    settled = cv.converge("a", [[10.0, 10.5], [10.0, 10.2]], b)
    late = cv.converge("b", [[20.0, 30.0], [10.0, 10.4]], b)
    text = cv.markdown([settled, late], b).splitlines()
    assert text[2].endswith("| 8 tokens |")
    assert "16 tokens only (the mean moved 145% from the budget before)" in text[3]  # |10.2 - 25| / 10.2


def test_flattest_share_counts_replicate_winners():
    shares = cv.flattest_share({"a": [1.0, 5.0, 2.0, 0.5], "b": [2.0, 1.0, 3.0, 0.7],
                                "c": [3.0, 4.0, 1.0, 9.0]})
    assert shares == {"a": 0.5, "b": 0.25, "c": 0.25}


@pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
def test_the_study_stores_what_direct_measurements_give(tmp_path, capsys):
    """The script on a user's saved model: a replicate's eigenvalues equal a Curvature on that replicate's
    held-out windows measured directly, and a direction's replicate value equals its Rayleigh quotient
    there."""
    from analyses import curvature_convergence as study
    from landscape.data import heldout_set
    from landscape.engine.directions import random_direction_of_length
    from landscape.models import load_model
    from landscape.store import read_store

    path = saved_tiny_llama(tmp_path / "model")
    argv = ["--model", str(path), "--budgets", "16", "48", "--replicates", "3", "2", "--seq-len", "16",
            "--k-top", "2", "--lanczos-steps", "6", "--trace-matvecs", "0", "--random", "1",
            "--out", str(tmp_path / "c.h5"), "--no-progress"]
    study.main(argv)
    assert "u^T H u, random0" in capsys.readouterr().out
    store = read_store(tmp_path / "c.h5")
    lm = load_model(str(path))
    windows = heldout_set(lm.tokenizer, 16, "wiki", 6)
    # replicate 1 at 48 tokens = windows 3, 4, 5
    direct = Curvature(lm.model, windows.subset([3, 4, 5]), batch_size=1)
    stored = Spectrum.from_data(store, "spectrum/48/1").top.eigenvalues
    assert stored == pytest.approx(direct.spectrum(2, 0, lanczos_steps=6).top.eigenvalues, rel=1e-5)
    plan = study.parse(argv)[0].plan
    per_window = DirectionalCurvature.from_data(store, "curvature/random0")
    values = cv.group_estimates(per_window.unit_sums, per_window.unit_tokens, plan)
    direction = random_direction_of_length(lm.model, 0, 1.0)
    assert values[1][1] == pytest.approx(direct.rayleigh_quotient(direction).value, rel=1e-4)
    assert values[0][2] == pytest.approx(
        Curvature(lm.model, windows.subset([2]), batch_size=1).rayleigh_quotient(direction).value, rel=1e-4)


def test_the_study_refuses_bad_requests_before_loading(tmp_path, capsys):
    from analyses import curvature_convergence as study

    base = ["--model", "nowhere", "--out", str(tmp_path / "c.h5")]
    for extra, match in [(["--budgets", "100"], "multiples of seq_len=128"),
                         (["--replicates", "1", "2"], "one count or one per budget"),
                         (["--direction", "gptq"], "NAME=RESULT_PATH"),
                         (["--direction", f"gptq={tmp_path}/none"], "no saved quantization results"),
                         (["--trace-matvecs", "3"], "0 or >= 6"),
                         (["--k-top", "3", "--lanczos-steps", "4"], "lanczos_steps must be >= 2 x k_top")]:
        with pytest.raises(SystemExit):
            study.parse(base + extra)
        assert re.search(match, capsys.readouterr().err)


@pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
def test_landscape_spectrum_budgets_runs_the_sweep_at_w0(tmp_path, capsys, monkeypatch):
    """``landscape spectrum --budgets``: flags the sweep does not take are refused before the model loads; the
    stored replicate's trace is a Hutch++ run on that replicate's windows."""
    import landscape.cli.spectrum  # noqa: F401  (registers the command)
    from landscape import models
    from landscape.cli import main
    from landscape.curvature import TraceEstimate
    from landscape.data import heldout_set
    from landscape.models import load_model
    from landscape.store import read_store

    base = ["spectrum", "ref-tiny", "--k", "1", "--k-bottom", "0", "--lanczos-steps", "4", "--trace-matvecs",
            "6", "--budgets", "16", "32", "--replicates", "2", "--no-progress"]
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the check"))
    for bad, message in ((["--seq-len", "16", "--density-runs", "1"], "does not take --density-runs"),
                         ([], "--budgets needs --seq-len"),
                         (["--seq-len", "10"], "multiples of seq_len=10")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad.h5")]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(models, "load_model", real_load)
    assert main([*base, "--seq-len", "16", "--out", str(tmp_path / "s.h5")]) == 0
    assert "trace (Hutch++)" in capsys.readouterr().out
    store = read_store(tmp_path / "s.h5")
    assert store.provenance["tasks"] == ["spectrum/16/0", "trace/16/0", "spectrum/16/1", "trace/16/1",
                                         "spectrum/32/0", "trace/32/0", "spectrum/32/1", "trace/32/1"]
    lm = load_model("ref-tiny")
    windows = heldout_set(lm.tokenizer, 16, "wiki", 4, context_length=lm.info.context_length)
    direct = Curvature(lm.model, windows.subset([2, 3]), batch_size=1, progress=False).trace(6)
    assert TraceEstimate.from_data(store, "trace/32/1").value == pytest.approx(direct.value, rel=1e-6)
