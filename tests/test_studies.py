"""The study scripts beyond the figures (learning-rate sweep, misalignment split at R, curvature along several
formats) on ref-tiny: what they store equals what they claim, reruns reuse finished work, bad input stops
them before the model loads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_store

from analyses import curvature_study, lr_sweep, misalignment_basin, quant_table
from landscape.store import read_store
from landscape.studies.misalignment import Misalignment

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")  # few Lanczos steps
SHORT = ["--model", "ref-tiny", "--calib-seq-len", "32"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """RTN, GPTQ and QAFT of ref-tiny at int4 saved the way the quantization tables save them."""
    out = tmp_path_factory.mktemp("tables")
    # A module fixture runs before the autouse ones: use the same private cache and thread count as the tests,
    # so ref-tiny (trained on first use; its weights depend on the thread count) is the model they load.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDSCAPE_CACHE", str(tmp_path_factory.getbasetemp() / "landscape-cache"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _quant_tables(out)
        finally:
            torch.set_num_threads(threads)
    return out / "results"


def _quant_tables(out):
    quant_table.main([*SHORT, "--out", str(out), "--core-formats", "int4", "--only", "core-int4",
                      "--core-methods", "rtn", "gptq", "qaft", "--eval-seq-len", "32", "--eval-segments", "4",
                      "--layer-mse-sequences", "2", "--qaft-lr", "1e-3"])


def test_lr_sweep_picks_the_lowest_validation_nll_and_equals_one_sweep_over_all_candidates(tmp_path, capsys):
    """One task per (format, candidate), combined: the same numbers as one select_learning_rate over every
    candidate; a rerun reads the store back; debug jobs give the same store."""
    from landscape.data import calibration_set
    from landscape.models import load_model
    from landscape.quant.lr_selection import LearningRateSweepSettings, select_learning_rate
    from landscape.quant.qaft import FinetuneSettings

    out = tmp_path / "sweep.h5"
    args = [*SHORT, "--formats", "int3", "--candidates", "1e-2", "1e-4", "--out", str(out), "--no-progress"]
    lr_sweep.main(args)
    sweep = lr_sweep.sweeps(read_store(out))["int3"]
    assert sweep.candidates == (1e-4, 1e-2)
    assert sweep.best_lr == sweep.candidates[int(np.argmin(sweep.validation_nll))]
    assert len(sweep.validation_sequences) == 16 and len(sweep.train_sequences) == 112
    lm = load_model("ref-tiny")
    calib = calibration_set(lm.tokenizer, 128, 32, 0, context_length=lm.info.context_length)
    whole = select_learning_rate(lm.base, calib, "int3", FinetuneSettings(),
                                 LearningRateSweepSettings((1e-2, 1e-4)), progress=False)
    assert (whole.validation_nll, whole.best_lr, whole.start_validation_nll) == \
        (sweep.validation_nll, sweep.best_lr, sweep.start_validation_nll)
    first = capsys.readouterr().out
    before = out.stat().st_mtime_ns
    lr_sweep.main(args)  # finished: printed again, not recomputed
    assert out.stat().st_mtime_ns == before and capsys.readouterr().out == first
    assert "**chosen**" in first
    jobs = tmp_path / "jobs.h5"
    lr_sweep.main([*args[:args.index("--out")], "--out", str(jobs), "--executor", "debug", "--jobs", "2"])
    assert_same_store(jobs, out)
    with pytest.raises(SystemExit):
        lr_sweep.main([*SHORT, "--candidates", "0", "--out", str(tmp_path / "x.h5")])


def test_misalignment_split_counts_candidates_inside_the_radius(tables, tmp_path, capsys):
    out = tmp_path / "mis.h5"
    misalignment_basin.main([*SHORT, "--results", str(tables), "--radius", "0.5", "--out", str(out),
                             "--gptq-formats", "int6", "--rounding-formats", "int6", "int3", "--seeds", "0",
                             "--eval-seq-len", "32", "--eval-segments", "4", "--mse-sequences", "2"])
    study = Misalignment.from_store(out)
    labels = set(study.candidates.labels)
    assert {"rtn int4", "gptq int4", "qaft int4 lr0.001", "rtn int8", "gptq int6",
            "stochastic int3 f1 s0"} <= labels
    norms = study.candidates.displacement_norm
    assert study.inside.n == int((norms <= 0.5).sum()) and study.outside.n == int((norms > 0.5).sum())
    assert study.inside.n + study.outside.n == len(labels) and study.inside.n > 0 and study.outside.n > 0
    with pytest.raises(SystemExit):  # an existing store is never overwritten
        misalignment_basin.main([*SHORT, "--results", str(tables), "--radius", "0.5", "--out", str(out)])
    # re-analysis of the measured candidates at another radius, without the model; the subsets are printed
    capsys.readouterr()
    again = tmp_path / "mis-r2.h5"
    misalignment_basin.main(["--from-store", str(out), "--radius", "2.0", "--out", str(again)])
    printed = capsys.readouterr().out
    assert "## post-training methods only" in printed and "Within each format" in printed
    redo = Misalignment.from_store(again)
    assert redo.inside.n == int((norms <= 2.0).sum()) and redo.candidates.labels == study.candidates.labels
    np.testing.assert_array_equal(redo.candidates.nll, study.candidates.nll)
    assert {f.format for f in redo.within_format.per_format} == set(study.candidates.formats)
    with pytest.raises(SystemExit):  # not a misalignment study
        misalignment_basin.main(["--from-store", str(tmp_path / "missing.h5"), "--radius", "2.0"])
    with pytest.raises(SystemExit):  # measuring needs --results and --out
        misalignment_basin.main([*SHORT, "--radius", "0.5"])
    with pytest.raises(SystemExit):
        misalignment_basin.main([*SHORT, "--results", str(tables), "--radius", "-1", "--out",
                                 str(tmp_path / "y.h5")])


def test_curvature_study_paths_have_their_displacement_norms_and_a_rerun_does_nothing(tables, tmp_path,
                                                                                      capsys):
    out = tmp_path / "curv.h5"
    args = [*SHORT, "--results", str(tables), "--formats", "int4", "--qaft-lr", "1e-3", "--seq-len", "16",
            "--k-top", "2", "--k-bottom", "1", "--lanczos-steps", "6", "--trace-matvecs", "6", "--t", "0",
            "1", "--out", str(out)]
    curvature_study.main(args)
    data = read_store(out)
    assert data.complete and list(data.provenance["tasks"])[:2] == ["spectrum", "trace"]
    attrs = {label: json.loads(str(data.arrays[f"path/{label}/attrs"]))
             for label in ("rtn int4", "gptq int4", "qaft int4", "random (GPTQ int4's length)")}
    assert all(f"path/{label}/slope" in data.arrays for label in attrs)  # the first-order term rides along
    assert attrs["random (GPTQ int4's length)"]["direction_norm"] == pytest.approx(
        attrs["gptq int4"]["direction_norm"], rel=1e-6)
    assert all(math.isfinite(v) for label in attrs for v in data.arrays[f"path/{label}/curvature"])
    top = data.arrays["spectrum/top/eigenvalues"]
    assert top[0] >= top[1] >= data.arrays["spectrum/bottom/eigenvalues"][0]
    printed = capsys.readouterr().out
    before = out.stat().st_mtime_ns
    curvature_study.main(args)  # complete: read back, nothing recomputed
    assert out.stat().st_mtime_ns == before and capsys.readouterr().out == printed
    # the tasks as 3 jobs (in this process): each writes its shard, the merge equals the one-process store
    jobs = tmp_path / "jobs.h5"
    curvature_study.main([*args[:args.index("--out")], "--out", str(jobs), "--executor", "debug",
                          "--jobs", "3"])
    assert_same_store(jobs, out)
    assert capsys.readouterr().out.endswith(printed.split("\n", 1)[1])
    with pytest.raises(SystemExit):  # refused before the model loads
        curvature_study.main([*SHORT, "--results", str(tables), "--trace-matvecs", "3",
                              "--out", str(tmp_path / "z.h5")])
    # the spectrum alone, its basis on disk: the same eigenvalues as the run above
    krylov = tmp_path / "krylov"
    krylov.mkdir()
    spectrum_only = tmp_path / "spectrum.h5"
    curvature_study.main([*args[:args.index("--out")], "--no-paths", "--krylov-dir", str(krylov),
                          "--out", str(spectrum_only)])
    alone = read_store(spectrum_only)
    assert [t for t in alone.provenance["tasks"]] == ["spectrum", "trace"] and list(krylov.iterdir()) == []
    np.testing.assert_array_equal(alone.arrays["spectrum/top/eigenvalues"],
                                  data.arrays["spectrum/top/eigenvalues"])
    # another saved result's displacement (here RTN's, under its file name): the same numbers as its format
    # path
    also = tmp_path / "also.h5"
    curvature_study.main([*args[:args.index("--out")], "--no-spectrum", "--formats", "--also", "rtn-int4",
                          "--out", str(also)])
    extra = read_store(also)
    assert extra.provenance["tasks"] == ["path/rtn-int4"]
    np.testing.assert_array_equal(extra.arrays["path/rtn-int4/curvature"],
                                  data.arrays["path/rtn int4/curvature"])
    np.testing.assert_array_equal(extra.arrays["path/rtn-int4/slope"], data.arrays["path/rtn int4/slope"])
    for bad in (["--no-paths", "--no-spectrum"], ["--krylov-dir", str(tmp_path / "missing")],
                ["--no-spectrum", "--formats"], ["--also", "no-such-result"],
                ["--no-paths", "--also", "rtn-int4"]):
        with pytest.raises(SystemExit):
            curvature_study.main([*SHORT, "--results", str(tables), *bad, "--out", str(tmp_path / "z.h5")])


def test_predict_gap_cases_are_the_tables_gptq_minus_qaft(tables, tmp_path):
    from analyses import predict_gap
    from landscape.studies.predict import PredictorEvaluation, cases_from_quant_table
    from landscape.studies.quant_table import read_quant_table

    store = tables.parent / "core-int4.h5"
    out = tmp_path / "predict.h5"
    predict_gap.main(["--model", "ref-tiny", "0.5", str(store), "--out", str(out)])
    (case,) = PredictorEvaluation.from_store(out).cases
    rows = {r["label"]: r for r in read_quant_table(store).rows}
    assert case.gap == pytest.approx(rows["gptq int4"]["nll"]["wiki"] - rows["qaft int4 s0"]["nll"]["wiki"],
                                     abs=1e-12)
    assert case.score == pytest.approx(rows["rtn int4"]["displacement_norm"] / 0.5, rel=1e-12)
    fp32 = next(r for r in rows.values() if r["method"] == "fp32")
    (direct,) = cases_from_quant_table(read_quant_table(store), 0.5)
    assert direct.nll_w0 == fp32["nll"]["wiki"]  # the baselines' NLL(w0), from the same table
    for bad in (["--model", "ref-tiny", "-2", str(store)], ["--model", "ref-small", "0.5", str(store)],
                ["--model", "ref-tiny", "0.5", str(tmp_path / "none.h5")]):
        with pytest.raises(SystemExit):
            predict_gap.main(bad)


def test_lr_sweep_of_the_control_starts_at_w0_and_never_quantizes(tmp_path):
    from landscape.data import calibration_set
    from landscape.models import load_model
    from landscape.objectives import nll

    out = tmp_path / "sweep.h5"
    lr_sweep.main([*SHORT, "--formats", "fp32", "--candidates", "1e-3", "0.5", "--out", str(out)])
    (sweep,) = lr_sweep.sweeps(read_store(out)).values()
    assert sweep.method == "fp-finetune" and sweep.format is None
    lm = load_model("ref-tiny")
    calib = calibration_set(lm.tokenizer, 128, 32, 0, context_length=lm.info.context_length)
    assert sweep.start_validation_nll == nll(lm.model, calib.subset(list(sweep.validation_sequences)),
                                             batch_size=8).value  # w0 itself, not a rounded model
    assert sweep.best_lr == 1e-3  # a rate of 0.5 wrecks a full-precision model
