"""analyses/explore.py (the marimo notebook) run as a plain script on a folder of tiny stores: it finds every
store, lists the quantization-table rows of the chosen model and format as the store holds them, and draws
the chosen store's page with the store's own numbers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import saved_tiny_llama

from landscape.cli import main as cli_main
from landscape.models import load_model
from landscape.plots.stores import store_figure
from landscape.store import read_store
from landscape.studies.quant_table import Protocol, quant_table_rows, run_quant_table

marimo = pytest.importorskip("marimo")  # the `explore` extra (make setup installs it)
SMALL = ["--segments", "2", "--seq-len", "16", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    model = saved_tiny_llama(root / "my-llama")
    stores = root / "figures" / "data"
    assert cli_main(["scan", str(model), "--kind", "filter", "--grid", "-1:1:5", *SMALL,
                     "--out", str(stores / "scan.h5")]) == 0
    protocol = Protocol(model=str(model), calib_sequences=8, calib_seq_len=16, eval_corpora=("wiki",),
                        eval_seq_len=16, eval_segments=2, formats=("int4", "int3"), methods=("rtn", "gptq"))
    run_quant_table(protocol, stores / "quant", progress=False, lm=load_model(str(model)))
    return root / "figures"


def test_the_notebook_lists_rows_and_draws_a_store(folder, monkeypatch):
    from analyses.explore import app

    monkeypatch.setattr(sys, "argv", ["explore.py", "--folder", str(folder)])
    _, defs = app.run()
    paths = sorted(folder.rglob("*.h5"))
    assert sorted(defs["stores"]) == paths and len(paths) == 2
    table = read_store(folder / "data" / "quant" / "quant_table.h5")
    fmt = defs["fmt"].value
    expected = [r for r in quant_table_rows(table) if r["format"] in (fmt, "")]
    assert [r["label"] for r in defs["selected_rows"]] == [r["label"] for r in expected]
    assert [r["NLL (in-domain)"] for r in defs["selected_rows"]] == [r["nll"]["wiki"] for r in expected]
    scan = read_store(folder / "data" / "scan.h5")
    np.testing.assert_array_equal(defs["page"].data[0].y, store_figure(scan).data[0].y)


def test_the_notebook_runs_as_a_plain_script(folder):
    done = subprocess.run([sys.executable, "analyses/explore.py", "--folder", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
