"""``landscape export R --format compressed-tensors``: our RTN and GPTQ results (asymmetric and symmetric,
per channel and per group, 3 and 4 bits) written with the compressed-tensors library reload through
transformers with the NLL of our own quantized model to 1e-5; importing the export gives our weights back on
our grid; formats compressed-tensors cannot hold are refused before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_tokens, saved_tiny_llama, tiny_model
from transformers import AutoModelForCausalLM

from landscape.cli import main as cli_main
from landscape.interop import import_checkpoint
from landscape.models import load_model
from landscape.objectives import nll
from landscape.quant import gptq, rtn
from landscape.weights import Base, swapped_weights


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("export") / "my-llama")


@pytest.mark.parametrize("method, fmt", [("rtn", "int4-g16"), ("gptq", "int3"), ("rtn", "int4-g16-sym"),
                                         ("gptq", "int4-sym")])
def test_an_export_reloads_with_our_nll(model_dir, tmp_path, capsys, method, fmt):
    lm = load_model(str(model_dir))
    data = random_tokens(6, 16, vocab=len(lm.tokenizer))
    result = rtn(lm.base, fmt) if method == "rtn" else gptq(lm.base, data, fmt, progress=False)
    saved = tmp_path / "r"
    result.save(saved)
    with swapped_weights(lm.model, result.weights):
        ours = nll(lm.model, data).value
    out = tmp_path / "ct"
    assert cli_main(["export", str(saved), "--out", str(out), "--model", str(model_dir)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert nll(reloaded, data).value == pytest.approx(ours, abs=1e-5)
    back = import_checkpoint(Base(load_model(str(model_dir)).model, "m"), out)
    assert back.format is not None and back.format.name == result.format.name, back.extra
    for name, w in result.weights.items():
        torch.testing.assert_close(back.weights[name], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt, message", [
    ("int4-g16-fz", r"real-valued zero point; compressed-tensors stores integer zero points"),
    ("mxint4-32", r"MX block format"),
    ("int4-tensor", r"one scale per tensor only symmetric"),
])
def test_formats_it_cannot_hold_are_refused_before_anything(model_dir, tmp_path, capsys, fmt, message):
    lm = load_model(str(model_dir))
    saved = tmp_path / "r"
    rtn(lm.base, fmt).save(saved)
    capsys.readouterr()
    out = tmp_path / "ct"
    assert cli_main(["export", str(saved), "--out", str(out), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and __import__("re").search(message, err), err
    assert not out.exists()


def test_a_gpt2_conv1d_model_is_refused(tmp_path):
    from landscape.interop.export import export_compressed_tensors
    from landscape.interop.gptq_packed import CheckpointError

    model = tiny_model("gpt2")
    with pytest.raises(CheckpointError, match=r"is a Conv1D"):
        export_compressed_tensors(model, None, rtn(Base(model, "g"), "int4"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
