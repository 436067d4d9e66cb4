"""The bf16-against-fp32 study (analyses/precision.py) on ref-tiny: the table's differences are the stored
numbers' differences, and a rerun reads the stores instead of measuring again."""

from __future__ import annotations

import numpy as np
import pytest

from analyses import precision
from landscape.store import read_store

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
ARGV = ["--model", "ref-tiny", "--segments", "4", "--seq-len", "32", "--calib-sequences", "8",
        "--directions", "2", "--radius-segments", "2", "--lanczos-steps", "6"]


def test_the_table_reports_the_stored_numbers_and_a_rerun_measures_nothing(tmp_path, capsys, monkeypatch):
    assert precision.main([*ARGV, "--out", str(tmp_path)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| NLL")]
    assert [row.split(" | ")[0] for row in table] == [
        "| NLL w0 (nats/token)", "| NLL rtn-int4 (nats/token)", "| NLL rtn-int3 (nats/token)",
        "| NLL gptq-int4 (nats/token)", "| NLL gptq-int3 (nats/token)"]
    args = precision.parse_args([*ARGV, "--out", str(tmp_path)])
    fp32, bf16 = (read_store(precision.store_path(args, d)) for d in precision.DTYPES)
    assert fp32.provenance["dtype"] == "float32" and bf16.provenance["dtype"] == "bfloat16"
    for row, task in zip(table, ["w0", "rtn-int4", "rtn-int3", "gptq-int4", "gptq-int3"]):
        mean = {name: float(np.sum(s.arrays[f"{task}/segment_nll_sum"])
                            / np.sum(s.arrays[f"{task}/segment_tokens"]))
                for name, s in (("fp32", fp32), ("bf16", bf16))}
        shown = float(row.split(" | ")[3].split(" [")[0])
        assert shown == pytest.approx(mean["bf16"] - mean["fp32"], abs=1e-4), row
        assert abs(shown) < 0.05  # ref-tiny in bf16 stays within a few hundredths of a nat

    def no_tasks(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(precision, "run_tasks", no_tasks)
    monkeypatch.setattr(precision, "load_model_of", no_tasks)  # a finished study loads no model either
    assert precision.main([*ARGV, "--out", str(tmp_path)]) == 0
