"""Determinism: the same commands with the same seeds give bit-identical outputs, run in two fresh processes.

A child process (:data:`PIPELINE`) builds a small reference model from scratch (``landscape.refmodel``, a
registered micro config: BPE tokenizer and a few AdamW steps on the bundled corpus), then runs the CLI
commands ``quantize --method gptq``, ``quantize --method qaft``, ``scan`` (with layer MSE) and ``radius`` on
it, and a Lanczos run of :meth:`landscape.curvature.Curvature.spectrum`. The test runs it twice, with
different ``PYTHONHASHSEED`` values (so an order that depends on string hashing would show), and compares:

* model weights and tokenizer files, and quantized weights: byte for byte;
* result stores: every array bit for bit and the provenance equal (except ``created``, a timestamp);
* quantized-result metadata equal except wall times; Lanczos eigenvalues and eigenvectors bit for bit.

Wall times (:data:`WALL_TIMES`, e.g. the model build's ``train_seconds``, also where a store's provenance
quotes it) are measurements of the run, not results, and are the only values excluded besides ``created``.
The cache (corpus token streams) is shared by the two runs; the model is rebuilt (``force``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape.store import RUN_SPECIFIC_KEYS, read_store

PIPELINE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    from landscape import cli
    from landscape.curvature import Curvature
    from landscape.data import heldout_set
    from landscape.models import load_model
    from landscape.refmodel import REF_CONFIGS, RefModelConfig, build_reference_model

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    REF_CONFIGS["ref-micro"] = RefModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_ctx=32,
                                              batch_size=4, epochs=0.05, warmup_steps=2,
                                              max_train_documents=40)
    model_dir = build_reference_model("ref-micro", force=True, progress=False)
    (out / "model").mkdir()
    for name in ("model.safetensors", "tokenizer.json", "landscape_build.json"):
        (out / "model" / name).write_bytes((model_dir / name).read_bytes())

    calib = ["--calib-sequences", "8", "--calib-seq-len", "32", "--no-progress"]
    data = ["--seq-len", "32", "--segments", "2", "--no-progress"]
    commands = [
        ["quantize", "ref-micro", "--method", "gptq", "--format", "int3", "--out", str(out / "gptq"), *calib],
        ["quantize", "ref-micro", "--method", "qaft", "--format", "int3", "--lr", "1e-3",
         "--train-batch-size", "4", "--seed", "3", "--out", str(out / "qaft"), *calib],
        ["scan", "ref-micro", "--kind", "filter", "--seed", "5", "--grid", "-1:1:3", "--layer-mse",
         "--out", str(out / "scan.h5"), *data],
        ["radius", "ref-micro", "--directions", "2", "--seed", "7", "--threshold", "0.05", "--tolerance",
         "0.2", "--out", str(out / "radius.h5"), *data],
    ]
    for argv in commands:
        assert cli.main(argv) == 0, argv

    lm = load_model("ref-micro")
    spectrum = Curvature(lm.model, heldout_set(lm.tokenizer, 32, max_segments=2), progress=False).spectrum(
        k=2, k_bottom=1, lanczos_steps=8, seed=11)
    np.savez(out / "lanczos.npz", **spectrum.to_record().arrays)
""")
WALL_TIMES = ("seconds", "layer_seconds", "seconds_per_step", "train_seconds", "convert_seconds")


def run_pipeline(out: Path, hash_seed: int) -> None:
    out.mkdir()
    script = out.parent / "pipeline.py"
    script.write_text(PIPELINE)
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def without_wall_times(tree):
    """A JSON value with every wall-time entry removed, at any depth."""
    if isinstance(tree, dict):
        return {k: without_wall_times(v) for k, v in tree.items() if k not in WALL_TIMES}
    if isinstance(tree, list):
        return [without_wall_times(v) for v in tree]
    return tree


def assert_stores_identical(a: Path, b: Path) -> None:
    first, second = read_store(a), read_store(b)
    assert first.complete and second.complete
    assert sorted(first.arrays) == sorted(second.arrays)
    for name, array in first.arrays.items():
        other = second.arrays[name]
        assert array.dtype == other.dtype and array.shape == other.shape, name
        assert array.tobytes() == other.tobytes(), f"{a.name}: {name} differs"
    strip = lambda p: without_wall_times({k: v for k, v in p.items()  # noqa: E731
                                          if k not in RUN_SPECIFIC_KEYS})
    assert strip(first.provenance) == strip(second.provenance)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    first, second = root / "a", root / "b"
    run_pipeline(first, hash_seed=1)
    run_pipeline(second, hash_seed=2)
    return first, second


def test_reference_model_build_is_bit_identical(two_runs):
    first, second = two_runs
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / "model" / name).read_bytes() == (second / "model" / name).read_bytes(), name
    meta = [json.loads((run / "model" / "landscape_build.json").read_text()) for run in two_runs]
    assert meta[0]["steps"] >= 2 and without_wall_times(meta[0]) == without_wall_times(meta[1])


@pytest.mark.parametrize("method", ["gptq", "qaft"])
def test_quantized_weights_are_bit_identical(two_runs, method):
    first, second = two_runs
    assert (first / f"{method}.safetensors").read_bytes() == (second / f"{method}.safetensors").read_bytes()
    meta = [json.loads((run / f"{method}.json").read_text()) for run in two_runs]
    # the sha256 of the metadata covers its wall times too; the tensors' is the same
    hashes = [m.pop("sha256") for m in meta]
    assert hashes[0]["tensors"] == hashes[1]["tensors"]
    assert meta[0]["method"] == method and without_wall_times(meta[0]) == without_wall_times(meta[1])


@pytest.mark.parametrize("store", ["scan.h5", "radius.h5"])
def test_scan_and_radius_stores_are_bit_identical(two_runs, store):
    first, second = two_runs
    assert_stores_identical(first / store, second / store)


def test_lanczos_eigenpairs_are_bit_identical(two_runs):
    first, second = (np.load(run / "lanczos.npz") for run in two_runs)
    assert sorted(first.files) == sorted(second.files) and "top/eigenvalues" in first.files
    for name in first.files:
        assert first[name].tobytes() == second[name].tobytes(), name


def test_the_comparison_detects_a_one_ulp_change(two_runs, tmp_path):
    """The store comparison is bit-exact: one value moved by one unit in the last place is a difference."""
    copy = Path(shutil.copy(two_runs[0] / "scan.h5", tmp_path / "scan.h5"))
    with h5py.File(copy, "r+") as f:
        f["nll"][1] = np.nextafter(f["nll"][1], np.inf)
    with pytest.raises(AssertionError, match="nll differs"):
        assert_stores_identical(two_runs[0] / "scan.h5", copy)
