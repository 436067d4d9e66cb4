"""Safe loading: models, quantized results, stores and caches are read without unpickling anything.

The threat: a user-supplied path holding a pickle (``pytorch_model.bin``, ``*.pt``) whose unpickling runs
code. Every payload here is live: :func:`test_the_payload_is_live` shows that a plain ``torch.load`` of it
runs ``os.makedirs(marker)``. The other tests hand such files to landscape's loaders and check that they are
refused with a clear error, that the marker never appears, and that ``torch.load`` is not even called.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_model

import landscape
from landscape import cli
from landscape.cache import write_manifest
from landscape.data import DataError, token_stream, tokenizer_id
from landscape.engine.directions import displacement_direction
from landscape.models import UnsafeModelFileError, load_model
from landscape.quant import QuantResult, ResultFileError, rtn
from landscape.refmodel import train_tokenizer
from landscape.store import StoreError, read_store


class Payload:
    """Unpickling this object calls ``os.makedirs(marker)``: proof that a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def write_pickle_checkpoint(path: Path, marker: Path) -> Path:
    """A torch checkpoint (zip + pickle, what ``torch.save`` and old ``save_pretrained`` write) carrying the
    payload."""
    torch.save({"transformer.wte.weight": Payload(marker)}, path)
    return path


@pytest.fixture
def torch_load_calls(monkeypatch) -> list:
    """Every call of ``torch.load`` (refused: a safe loader never reaches it)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", spy)
    return calls


def model_directory(path: Path, with_safetensors: bool) -> Path:
    """A tiny GPT-2 directory: config, tokenizer and (optionally) model.safetensors."""
    tokenizer = train_tokenizer(["the landscape around the pretrained weights"] * 20, 280)
    model = tiny_model("gpt2", vocab=len(tokenizer), seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if not with_safetensors:
        (path / "model.safetensors").unlink()
    return path


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "executed"
    checkpoint = write_pickle_checkpoint(tmp_path / "pytorch_model.bin", marker)
    torch.load(checkpoint, weights_only=False)  # what an unsafe loader does
    assert marker.is_dir()


def test_a_model_directory_with_only_pickled_weights_is_refused_unopened(tmp_path, torch_load_calls, capsys):
    directory = model_directory(tmp_path / "model", with_safetensors=False)
    marker = tmp_path / "executed"
    write_pickle_checkpoint(directory / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeModelFileError, match=r"\['pytorch_model.bin'\].*safetensors only"):
        load_model(str(directory))
    assert cli.main(["eval", str(directory)]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err
    assert not marker.exists() and torch_load_calls == []


def test_safetensors_are_loaded_and_a_pickle_beside_them_is_never_opened(tmp_path, torch_load_calls):
    directory = model_directory(tmp_path / "model", with_safetensors=True)
    marker = tmp_path / "executed"
    write_pickle_checkpoint(directory / "pytorch_model.bin", marker)
    loaded = load_model(str(directory)).model
    expected = tiny_model("gpt2", vocab=loaded.config.vocab_size, seed=3).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())  # the safetensors weights
    assert not marker.exists() and torch_load_calls == []


@pytest.mark.parametrize("remove, message", [
    (["tokenizer.json"], r"has no tokenizer \(one of tokenizer.json.*tokenizer.save_pretrained"),
    (["config.json"], r"has no config.json: save the model with model.save_pretrained"),
    (["model.safetensors"], r"holds no weights \(\*.safetensors\)"),
])
def test_a_model_directory_missing_a_part_is_refused_naming_it_before_loading(tmp_path, monkeypatch, remove,
                                                                              message):
    directory = model_directory(tmp_path / "model", with_safetensors=True)
    for name in remove:
        (directory / name).unlink()

    def no_load(*args, **kwargs):
        raise AssertionError("transformers was asked to load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(landscape.models.ModelNotFoundError, match=message):
        load_model(str(directory))


def test_remote_code_named_by_a_model_directory_is_not_executed(tmp_path):
    directory = model_directory(tmp_path / "model", with_safetensors=True)
    marker = tmp_path / "executed"
    (directory / "evil_model.py").write_text(f"import os\nos.makedirs({str(marker)!r})\n"
                                             f"from transformers import GPT2LMHeadModel as EvilModel\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(directory)).model
    assert type(loaded).__name__ == "GPT2LMHeadModel" and type(loaded).__module__.startswith("transformers.")
    assert not marker.exists()


def test_a_quantized_model_path_holding_a_pickle_is_refused(tmp_path, torch_load_calls):
    model = tiny_model("gpt2")
    marker = tmp_path / "executed"
    checkpoint = write_pickle_checkpoint(tmp_path / "quantized.pt", marker)
    with pytest.raises(ResultFileError, match="quantized.pt is not a saved QuantResult.*ever unpickled"):
        QuantResult.load(checkpoint)
    with pytest.raises(ResultFileError, match="not a saved QuantResult"):
        displacement_direction(model, checkpoint)

    # A pickle under the .safetensors name, beside valid metadata: the safetensors parser rejects it.
    stem = rtn(model, "int4").save(tmp_path / "rtn")
    shutil.copy(checkpoint, f"{stem}.safetensors")
    with pytest.raises(ResultFileError, match=r"rtn.safetensors is not a readable safetensors file"):
        QuantResult.load(stem)
    assert not marker.exists() and torch_load_calls == []


def test_stores_and_token_caches_holding_pickles_are_refused(tmp_path, torch_load_calls):
    marker = tmp_path / "executed"
    with pytest.raises(StoreError, match="not a readable HDF5 store"):
        read_store(write_pickle_checkpoint(tmp_path / "store.h5", marker))

    tokenizer = train_tokenizer(["a cached token stream"] * 5, 270)
    cache = Path(os.environ["LANDSCAPE_CACHE"]) / "tokens" / f"wiki-heldout-{tokenizer_id(tokenizer)}.npy"
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    write_manifest(cache)  # as if landscape had written it (without a manifest it is rebuilt, never read)
    with pytest.raises(DataError, match="not a plain integer array"):
        token_stream(tokenizer, "wiki", "heldout")
    assert not marker.exists() and torch_load_calls == []


# ------------------------------------------------------------------------------------- the source itself
def _unsafe_calls(source: str) -> list[str]:
    """Calls in ``source`` that could unpickle: ``pickle.load(s)``, ``torch.load`` without
    ``weights_only=True``, ``np.load`` with ``allow_pickle=True``, and a model's ``from_pretrained`` without
    ``use_safetensors=True`` (GGUF files, which hold no pickle, excepted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        name = f"{owner}.{node.func.attr}"
        if (node.func.attr in ("load", "loads") and owner in ("pickle", "cPickle", "dill")
                or name == "torch.load" and keywords.get("weights_only") != "True"
                or name in ("np.load", "numpy.load") and keywords.get("allow_pickle") not in (None, "False")
                or node.func.attr == "from_pretrained" and "Model" in owner
                and keywords.get("use_safetensors") != "True" and "gguf_file" not in keywords):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_the_checker_flags_unsafe_calls():
    unsafe = ("pickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
              "np.load(p, allow_pickle=True)\nAutoModelForCausalLM.from_pretrained(path)\n")
    safe = ("torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\n"
            "AutoTokenizer.from_pretrained(p)\n"
            "AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)\n"
            "AutoModelForCausalLM.from_pretrained(d, gguf_file=g)\n")
    assert len(_unsafe_calls(unsafe)) == 5 and _unsafe_calls(safe) == []


def test_no_module_of_landscape_can_unpickle():
    root = Path(landscape.__file__).parent
    offenders = {str(p.relative_to(root)): calls for p in sorted(root.rglob("*.py"))
                 if (calls := _unsafe_calls(p.read_text()))}
    assert offenders == {}
