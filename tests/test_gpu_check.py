"""The GPU check's comparison logic, run with the CPU on both sides (CI has no GPU): every measurement of the
study slice must agree with itself, the report must hold one row per measurement, and a device this machine
lacks must stop the check at once."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_check

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")


def test_cpu_against_cpu_agrees_on_every_measurement(tmp_path, capsys):
    report = tmp_path / "gpu.md"
    argv = ["--device", "cpu", "--reference", "cpu", "--model", "ref-tiny", "--segments", "2", "--seq-len",
            "32", "--calib-sequences", "8", "--gptq-blocks", "1", "--no-figures", "--report", str(report)]
    assert gpu_check.main(argv) == 0
    lines = report.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and "measurement" not in line]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert len(rows) == 7 and all(row.endswith("| yes |") for row in rows)
    assert any(n.startswith("GPTQ int4 layer MSE") for n in names) and "NLL(w0), nats/token" in names


def test_the_tolerances_reject_what_they_should():
    assert gpu_check.within(abs_tol=1e-3)(5.0, 5.0009)[0]
    assert not gpu_check.within(abs_tol=1e-3)(5.0, 5.0011)[0]
    assert gpu_check.within(rel_tol=1e-2)(float("inf"), float("inf"))[0]
    assert not gpu_check.within(rel_tol=1e-2)(float("inf"), 3.0)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_check_stops_at_once(capsys):
    assert gpu_check.main(["--no-figures"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
