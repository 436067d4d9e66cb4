"""Defects our own second probe found after the reliability work (issue #20's closing table), each reproduced:
``--max-memory`` accepted but not enforced by spectrum, compare and quantize; a copy of one shard merged as if
it were a second shard; a zero given to the quantization-table script's sizes answered without the flag's
name; Ctrl-C while the command imports torch and transformers answered with a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_bad_inputs import save_local_model
from test_store_reliability import cli_run

from analyses import quant_table
from landscape.quant import rtn
from landscape.start import INTERRUPTED_AT_START
from landscape.store import ResultStore, StoreError, merge_stores, read_store, with_shard
from landscape.weights import Base


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_local_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.mark.parametrize("command", ["spectrum", "compare", "quantize"])
def test_max_memory_is_enforced_before_any_file(model_dir, tmp_path, command):
    from landscape.models import load_model

    result = tmp_path / "r"
    rtn(Base(load_model(str(model_dir)).model, "m"), "int4").save(result)
    out = tmp_path / "x" / "out"
    argv = {"spectrum": ["spectrum", str(model_dir), "--out", f"{out}.h5"],
            "compare": ["compare", str(model_dir), str(result), "--out", f"{out}.h5"],
            "quantize": ["quantize", str(model_dir), "--method", "rtn", "--format", "int4", "--out",
                         str(out)]}
    status, _, err = cli_run([*argv[command], "--max-memory", "1K", "--segments", "2", "--seq-len", "16"]
                             if command != "quantize" else [*argv[command], "--max-memory", "1K"])
    assert status == 2 and "the memory is more than 1 KB (--max-memory)" in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "about" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_copy_of_one_shard_is_not_a_second_shard(tmp_path):
    arrays = {"nll": ((), np.float64)}
    path = tmp_path / "s0.h5"
    store = ResultStore.create(path, with_shard({"kind": "test", "model": "m"}, (0, 2)), arrays, (4,))
    store.write_point(0, {"nll": 1.0})
    store.write_point(2, {"nll": 3.0})
    store.finish()
    shutil.copy(path, tmp_path / "s0-copy.h5")
    with pytest.raises(StoreError, match=r"both shard 0/2 of the run: a copy of one shard, not two shards"):
        merge_stores(tmp_path / "m.h5", [path, tmp_path / "s0-copy.h5"])
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.h5.partial").exists()
    assert read_store(path).done.sum() == 2


@pytest.mark.parametrize("flag", ["--eval-segments", "--calib-seq-len", "--eval-seq-len", "--seeds",
                                  "--layer-mse-sequences"])
def test_the_quant_table_script_names_a_zero_size(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        quant_table.main(["--model", "ref-tiny", flag, "0", "--out", str(tmp_path / "qt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer, got 0" in err, err
    assert not (tmp_path / "qt").exists()


def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """A KeyboardInterrupt raised while transformers is imported (what Ctrl-C in the first second does)."""
    code = ("import builtins, runpy\n_import = builtins.__import__\n"
            "def interrupted(name, *args, **kwargs):\n"
            "    if name == 'transformers':\n        raise KeyboardInterrupt\n"
            "    return _import(name, *args, **kwargs)\n"
            "builtins.__import__ = interrupted\nrunpy.run_module('landscape', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code, "scan", "m", "--out", str(tmp_path / "s.h5")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == INTERRUPTED_AT_START + "\n", done.stderr
    assert not list(tmp_path.iterdir())


def test_importing_landscape_loads_no_torch_until_a_name_is_used():
    code = ("import sys, landscape\nassert 'torch' not in sys.modules\n"
            "from landscape import nll\n"
            "assert 'torch' in sys.modules and nll.__module__ == 'landscape.objectives'\n"
            "assert 'load_model' in dir(landscape)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
