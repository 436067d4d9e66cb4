"""The benchmark harness (bench/): the reference GPTQ against ours, the scan loops, the RESULTS.md writer,
timing helpers. No timing is asserted: targets are the benchmark's business, not the tests'."""

from __future__ import annotations

import json
import re
import statistics

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model

from bench.common import Row, Section, Table, Target, Timing, interleaved_medians, log_log_slope
from bench.gptq import check_identical, lattice_difference, reference_gptq_layer, reference_gptq_model
from bench.run import BenchReport, Failure, render_results, write_results
from bench.scan import engine_scan, naive_scan, plane
from landscape.quant import GPTQSettings, gptq, gptq_layer, make_grid
from landscape.weights import layer_weights


# ------------------------------------------------------------------------------------------- GPTQ
def layer_problem(out_f: int, in_f: int, seed: int = 0, dead: tuple[int, ...] = ()):
    """A weight and the Hessian 2/n X^T X of correlated inputs (float64); ``dead`` inputs are always 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(in_f, dtype=torch.float64)
             + 0.5 * torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    x[:, list(dead)] = 0
    return w, 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("fmt, act_order", [("int4", True), ("int3-g8", True), ("int3-g8", False),
                                            ("int4-sym", False), ("mxint4-8", True)])
def test_reference_gptq_layer_picks_the_same_lattice_points_as_ours(fmt, act_order):
    # 40 inputs with blocks of 16: ours uses three lazy blocks, the reference none; a dead input is kept.
    w, hessian = layer_problem(12, 40, dead=(5,))
    grid = make_grid(w, fmt)
    ours, _ = gptq_layer(w, hessian, grid, GPTQSettings(block_size=16, act_order=act_order))
    reference = reference_gptq_layer(w, hessian, grid, act_order=act_order)
    max_abs, max_steps, differing = lattice_difference({"w": ours}, {"w": reference}, {"w": grid})
    assert (max_abs, differing) == (0.0, 0)
    assert grid.contains(reference)
    assert not torch.equal(reference, grid.round(w))  # error feedback moved some weights off their RTN point


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reference_gptq_model_equals_gptq(arch):
    model = tiny_model(arch)
    w0 = layer_weights(model)
    calib = random_tokens(4, 16)
    ours = gptq(model, calib, "int4", progress=False).weights
    reference = reference_gptq_model(model, calib, "int4")
    grids = {n: make_grid(w, "int4", n) for n, w in w0.items()}
    report = check_identical("tiny", ours, reference, grids)
    assert report == {"max_abs_difference": 0.0, "max_difference_in_grid_steps": 0.0, "entries_differing": 0}
    assert all(torch.equal(ours[n], reference[n]) for n in ours)
    assert all(torch.equal(w, w0[n]) for n, w in layer_weights(model).items())  # both left w0 in the model


def test_check_identical_refuses_one_weight_one_grid_step_away():
    w, hessian = layer_problem(6, 16)
    grid = make_grid(w, "int4")
    ours = reference_gptq_layer(w, hessian, grid)
    moved = ours.clone()
    step = float(grid.scale[2, 0])
    moved[2, 3] += step
    max_abs, max_steps, differing = lattice_difference({"w": ours}, {"w": moved}, {"w": grid})
    assert differing == 1 and max_abs == pytest.approx(step) and max_steps == pytest.approx(1.0)
    with pytest.raises(AssertionError, match="1 weights"):
        check_identical("moved", {"w": ours}, {"w": moved}, {"w": grid})


# ------------------------------------------------------------------------------------------- scan
def test_engine_and_naive_loop_measure_the_same_nll():
    model = tiny_model("gpt2")
    data = random_tokens(4, 12)
    u, v = plane(model)
    axis = np.array([-0.3, 0.0, 0.4])
    engine = engine_scan(model, u, v, axis, data, batch_size=2)
    naive = naive_scan(model, u, v, axis, data, batch_size=2)
    assert engine.shape == naive.shape == (3, 3)
    np.testing.assert_allclose(engine, naive, rtol=0, atol=1e-5)
    assert np.ptp(engine) > 1e-3  # the points really differ: the comparison is not of nine equal numbers


# ------------------------------------------------------------------------------------------ helpers
def test_interleaved_medians_rotates_the_order_and_reports_medians():
    calls: list[str] = []
    timings = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                                   "c": lambda: calls.append("c")}, repeats=4, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab" + "abc")  # warm-up, then rounds rotated by one
    assert all(len(t.samples) == 4 for t in timings.values())
    for samples in [(3.0, 1.0, 2.0), (4.0, 1.0, 3.0, 2.0)]:
        assert Timing(samples).median == statistics.median(samples)


def test_log_log_slope_recovers_a_power_law():
    sizes = [10.0, 30.0, 100.0, 1000.0]
    assert log_log_slope(sizes, [3.0 * n**1.5 for n in sizes]) == pytest.approx(1.5, abs=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        log_log_slope([1.0], [1.0])


# ------------------------------------------------------------------------------------------ writer
MACHINE = {"date_utc": "2030-01-02 03:04:05 UTC", "cpu": "Test CPU", "logical_cpus": 2, "usable_cpus": 2,
           "memory_gib": 8.0, "platform": "Linux", "load_average_1m_5m_15m": [1.5, 1.0, 0.5],
           "python": "3.11.0", "versions": {"torch": "2.13.0"}, "git_commit": "abc1234", "git_dirty": True}


def sample_report() -> BenchReport:
    rows_a = (Row("scan", "tiny | model", "naive / engine", 6.0, "x", Target(5.0, "at_least"),
                  "6 ms vs 1 ms"),
              Row("scan", "tiny | model", "engine / forward", 1.5, "x", Target(1.3, "at_most"),
                  "1.5 ms vs 1 ms"))
    rows_b = (Row("scaling", "series", "time ~ params^slope", 0.87, "", None, ""),
              Row("gptq", "ref", "ours / reference", 1.2, "x", Target(1.2, "at_most"), ""))
    return BenchReport("tiny", "bench/run.py --tiny", MACHINE, (
        Section("scan", "Scan", rows_a, (Table("details", ("a", "b"), (("1", "2"),)),), ("why the miss",),
                {"cases": [1, 2]}, 1.0),
        Section("mixed", "Mixed", rows_b, (), (), {}, 2.0),
    ), (Failure("hessian", "Traceback ...\nRuntimeError: boom"),), 90.0, (2.0, 1.5, 1.0))


def summary_rows(markdown: str) -> list[list[str]]:
    """Cells of the summary table's body rows (split on unescaped pipes, escapes undone)."""
    lines = markdown.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert lines[0].startswith("| benchmark | case | metric | measured | target | status |")
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]


def test_results_markdown_has_one_summary_row_per_figure_with_its_status():
    report = sample_report()
    markdown = render_results(report)
    rows = summary_rows(markdown)
    assert [r[:6] for r in rows] == [
        ["scan", "tiny | model", "naive / engine", "6.00x", "≥ 5x", "PASS"],
        ["scan", "tiny | model", "engine / forward", "1.50x", "≤ 1.3x", "MISS"],
        ["scaling", "series", "time ~ params^slope", "0.87", "—", "—"],
        ["gptq", "ref", "ours / reference", "1.20x", "≤ 1.2x", "PASS"],  # exactly at the limit passes
    ]
    assert "**2 of 3 targets PASS, 1 MISS**; 1 benchmark(s) FAILED" in markdown
    for text in ("2030-01-02 03:04:05 UTC", "Test CPU", "torch 2.13.0", "`abc1234` with uncommitted changes",
                 "torch.set_num_threads(1)", "1.5 / 1.0 / 0.5 at the start", "- why the miss",
                 "RuntimeError: boom"):
        assert text in markdown


def test_write_results_writes_markdown_and_json_that_round_trip(tmp_path):
    report = sample_report()
    md_path, json_path = write_results(report, tmp_path)
    assert md_path.read_text(encoding="utf-8") == render_results(report)
    data = json.loads(json_path.read_text())
    assert tuple(Section.from_dict(s) for s in data["sections"]) == report.sections
    assert [r["status"] for r in data["summary"]] == ["PASS", "MISS", "—", "PASS"]
    assert data["machine"] == MACHINE and data["failures"][0]["benchmark"] == "hessian"
    # no temporary files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "results.json"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_results(report, tmp_path / "missing")


def memory_data(scan_extra: int, forward_extra: int, qaft_extra: int, train_extra: int,
                gptq_extra: int = 150, radius_extra: int = 90) -> dict:
    """Raw memory measurements (bytes) as bench/memory.py stores them, for a 100 MiB model with 75 MiB
    trained, its largest layer 5 MiB."""
    mib = 2**20

    def measured(workload: str, extra: int) -> dict:
        return {"workload": workload, "model": "m (26M params)", "baseline_bytes": 400 * mib, "peak_bytes": 0,
                "extra_bytes": extra * mib, "model_bytes": 100 * mib, "perturbed_bytes": 75 * mib,
                "trained_bytes": 75 * mib, "largest_layer_bytes": 5 * mib, "exact_peak_reset": True,
                "seconds": 1.0}

    settings = {"models": ["m"], "eval_segments": 4, "seq_len": 128, "batch_size": 4,
                "grid_points_per_axis": 3, "qaft_steps": 2, "qaft_batch_size": 4, "qaft_format": "int4",
                "malloc": {}}
    extras = {"scan": scan_extra, "forward": forward_extra, "qaft": qaft_extra, "train-step": train_extra,
              "gptq": gptq_extra, "radius": radius_extra}
    return {"settings": settings, "cases": [{w: measured(w, e) for w, e in extras.items()}]}


def test_memory_section_counts_model_sizes_without_activations():
    from bench.memory import build_section

    section = build_section(memory_data(scan_extra=105, forward_extra=80, qaft_extra=500, train_extra=100))
    scan_row, radius_row, gptq_row, qaft_row = section.rows
    assert scan_row.value == pytest.approx(1 + (105 - 80) / 100) and scan_row.status == "PASS"  # <= 1.3
    assert radius_row.value == pytest.approx(1 + (90 - 80) / 100) and radius_row.status == "PASS"
    # GPTQ returns its weights (75 MiB): they are its output, not its working memory
    assert gptq_row.value == pytest.approx(1 + (150 - 80 - 75) / 100) and gptq_row.status == "PASS"
    assert qaft_row.value == pytest.approx(1 + (500 - 100) / 100) and qaft_row.status == "MISS"  # > 4.5
    assert len(section.notes) == 1 and "by a factor of 1.11" in section.notes[0]  # 5.0 / 4.5
    assert "design estimate 3.25" in section.notes[0]  # 1 + 3 x 75 MiB / 100 MiB


def test_memory_section_reports_one_hvp_against_a_gradient_without_a_target():
    from bench.common import NO_TARGET
    from bench.memory import build_section

    data = memory_data(scan_extra=105, forward_extra=80, qaft_extra=400, train_extra=100)
    case = data["cases"][0]
    case["hvp"] = {**case["train-step"], "workload": "hvp", "extra_bytes": 400 * 2**20}
    section = build_section(data)
    hvp = section.rows[-1]
    assert "one Hessian-vector product" in hvp.case and hvp.status == NO_TARGET
    assert hvp.value == pytest.approx(1 + (400 - 100) / 100)  # beyond the gradient of one train step
    assert "4.00 x the trained weights" in hvp.detail  # 300 MiB over 75 MiB of trained weights
    assert not section.notes  # QAFT at 4.0 passes; an HVP has no target to miss
    assert any(row[1] == "hvp" and row[8] == "1.75" for row in section.tables[0].rows)  # 1 + 1 x 75 / 100


def test_rebuild_report_recomputes_every_section_from_its_stored_data():
    from bench.memory import build_section
    from bench.run import rebuild_report

    stale = build_section(memory_data(105, 80, 500, 100))
    section = Section(stale.name, stale.title, (), (), ("stale note",), stale.data, 7.0)
    stored = BenchReport("quick", "bench/run.py --quick", MACHINE, (section,)).to_dict()
    rebuilt = rebuild_report(json.loads(json.dumps(stored)))
    assert rebuilt.sections == (build_section(stale.data, 7.0),)
    assert ([r.status for r in rebuilt.rows] == ["PASS", "PASS", "PASS", "MISS"]
            and "stale note" not in rebuilt.sections[0].notes)
    assert rebuilt.machine == MACHINE and rebuilt.command == "bench/run.py --quick"
    assert rebuilt.rebuilt and "re-rendered from its results.json" in render_results(rebuilt)


def test_qaft_section_relates_a_step_to_one_forward_backward_and_splits_a_miss():
    from bench.qaft import build_section

    settings = {"models": ["a", "b"], "format": "int4", "batch_size": 4, "seq_len": 128, "steps": 4,
                "repeats": 3, "optimizer": "adamw"}
    cases = [{"model": "a (1M params)", "layers": 8, "qaft_step_s": 3.0, "control_step_s": 2.0,
              "forward_backward_s": 1.0, "run_s": {}},
             {"model": "b (1M params)", "layers": 8, "qaft_step_s": 1.2, "control_step_s": 1.1,
              "forward_backward_s": 1.0, "run_s": {}}]
    section = build_section({"settings": settings, "cases": cases})
    assert [r.value for r in section.rows] == pytest.approx([3.0, 1.2])
    assert [r.status for r in section.rows] == ["MISS", "PASS"]
    (note,) = section.notes  # only the miss is explained: 1 s of fake quantization, 1 s of loop
    assert note.startswith("a (1M params)") and "1 s is the fake quantization" in note
    assert "1 s the loop" in note
