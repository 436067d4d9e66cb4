"""The predictor and schedule studies (issue #22 items 4 and 5) end to end on two models, tiny profile:
ref-tiny and a user's own GPT-2-architecture checkpoint given with ``--size-models``.

Every plotted case must be the stored numbers recomputed independently: the score from a hand-written
per-channel rounding of w0 and the stored radii, the gap from the tables' per-segment NLL sums, RTN's SQNR
from the same hand rounding; the markdown reports must hold every case; a rerun must measure nothing. The
schedule study reuses the predictor study's tables and adds the Hessian at w0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import offline_pipeline, saved_tiny_llama
from test_baselines import hand_rtn_int4

from analyses import predictor_study, schedule_study
from analyses.plan import plan_text
from analyses.session import basin_store, parse_args, predictor_protocol, session_from_args, table_store
from landscape.store import read_store
from landscape.weights import quantizable_layers, weight_matrix

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")  # tiny Lanczos runs


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    with offline_pipeline(root):
        mine = str(saved_tiny_llama(root / "my-gpt2", arch="gpt2"))
        argv = ["--tiny", "--size-models", "ref-tiny", mine, "--out", str(root / "out"), "--no-png",
                "--no-progress"]
        assert predictor_study.main(argv) == 0
        assert schedule_study.main(argv) == 0  # measures only the Hessians: the tables are the ones above
        session = session_from_args(parse_args("", argv))
        yield session, mine


def stored_rows(session, model: str, fmt: str) -> dict[str, float]:
    """method -> token-mean wiki NLL from the per-segment sums of the first table with a GPTQ row at ``fmt``
    (the predictor table, then figure 7's), with its ``fp32`` and ``fp-finetune`` rows."""
    first = table_store(session, predictor_protocol(session, model))
    for path in (first, *sorted(first.parent.parent.glob("quant-*/quant_table.h5"))):
        a = read_store(path).arrays
        nll = a["segment_nll_sum/wiki"].sum(axis=1) / a["segment_tokens/wiki"].sum(axis=1)
        rows = {(str(m), str(f)): float(nll[i])
                for i, (m, f) in enumerate(zip(a["variants/method"], a["variants/format"], strict=True))}
        if ("gptq", fmt) in rows:
            return {m: v for (m, f), v in rows.items() if f == fmt or m in ("fp32", "fp-finetune")}
    raise AssertionError(f"no table of {model} has a GPTQ row at {fmt}")


def test_every_plotted_case_is_the_stored_numbers(study):
    session, mine = study
    fig = predictor_study.figure(session)
    models = [mine, "ref-tiny"]
    formats = ("int3", "int4", "int4-g32", "mxint4-32")
    for model in models:
        score = next(t for t in fig.data if t.name == model and t.xaxis == "x")  # raw gap x score
        assert sorted(score.text) == sorted(formats)
        radius = float(np.median(read_store(basin_store(session, model)).arrays["radius"]))
        lm = session.model(model)
        weights = [weight_matrix(m).detach().double().numpy() for m in quantizable_layers(lm.model).values()]
        d = [hand_rtn_int4(w) - w for w in weights]
        k = list(score.text).index("int4")
        assert score.x[k] == pytest.approx(math.sqrt(sum((x ** 2).sum() for x in d)) / radius, rel=1e-5)
        sqnr = next(t for t in fig.data if t.name == model and t.xaxis == "x3")
        assert sqnr.x[k] == pytest.approx(-np.mean([10 * math.log10((w ** 2).sum() / (x ** 2).sum())
                                                    for w, x in zip(weights, d, strict=True)]), rel=1e-5)
        for i, fmt in enumerate(score.text):
            nll = stored_rows(session, model, fmt)
            gap = nll["gptq"] - nll["qaft"]
            assert score.y[i] == pytest.approx(gap, abs=1e-9)
            control = nll["fp32"] - nll["fp-finetune"]
            after = next(t for t in fig.data if t.name == model and t.xaxis == "x5")
            assert after.y[list(after.text).index(fmt)] == pytest.approx(gap - control, abs=1e-9)


def test_the_report_holds_every_case_and_a_rerun_measures_nothing(study):
    session, mine = study
    report = (session.out / "predictor_study.md").read_text()
    first_table = report.split("\n\n")[0].splitlines()
    cases = [line for line in first_table if line.startswith(("| ref-tiny |", f"| {mine} |"))]
    assert len(cases) == 8 and all(line.count("|") == 10 for line in cases)  # 9 columns: inputs and both gaps
    assert report.count("largest correlation:") == 2  # raw and after the control
    assert "leave-one-model-out" in report and (session.out / "predictor_study.html").exists()
    assert "[to do" not in plan_text(predictor_study.steps(session), session)
    reading = predictor_study.reading(session)
    assert reading.startswith("raw (8 cases): best ") and "after the control (8 cases)" in reading


def test_schedule_study_reports_the_stored_costs_and_curvature(study):
    session, mine = study
    points = {p["model"]: p for p in schedule_study.summary(session)}
    assert list(points) == ["ref-tiny", mine]
    assert points["ref-tiny"]["schedule"].startswith("cosine")
    assert points[mine]["schedule"] == "not trained here"
    for model, p in points.items():
        for fmt in ("int3", "int4", "mxint4-32"):
            nll = stored_rows(session, model, fmt)
            for method in ("rtn", "gptq", "qaft"):
                cost = p["cost"][fmt][method]
                assert cost.value == pytest.approx(nll[method] - nll["fp32"], abs=1e-9)
                assert cost.low <= cost.value <= cost.high
        hessian = read_store(schedule_study.curvature_store(session, model))
        top = [float(v) for v in hessian.arrays["spectrum/top/eigenvalues"]]
        assert p["top"] == top and top == sorted(top, reverse=True)
        assert p["trace"] == json.loads(str(hessian.arrays["trace/attrs"]))["value"]
        radius = read_store(basin_store(session, model))
        assert p["relative_radius"] == pytest.approx(float(np.median(radius.arrays["radius"]))
                                                     / float(radius.arrays["weights_norm"]))
    report = (session.out / "schedule_study.md").read_text()
    assert f"| {mine} | not trained here |" in report and "paired 95 % bootstrap" in report
    nll = stored_rows(session, "ref-tiny", "int3")
    assert points["ref-tiny"]["control"].value == pytest.approx(nll["fp-finetune"] - nll["fp32"], abs=1e-9)
