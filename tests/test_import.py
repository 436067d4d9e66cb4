"""Importing GPTQ-packed checkpoints (``landscape import``): the displacement equals an independent
dequantization of the codes the test packed itself (v1 and v2 zero points, 3 and 4 bits, act-order group
indices, fp16 scales), a checkpoint packed from our own RTN grid comes back on that grid, and a checkpoint of
another base or with a packing we do not read is refused before anything is written.

The checkpoints are written here with a packer of the test's own (a loop over values setting bits in a
little-endian stream of 32-bit words, AutoGPTQ's layout), independent of the importer's vectorised unpacker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import saved_tiny_llama, tiny_model
from safetensors.torch import save_file

from landscape.cli import main as cli_main
from landscape.engine.directions import displacement_direction
from landscape.interop import import_checkpoint
from landscape.interop.gptq_packed import CheckpointError, unpack_rows
from landscape.quant import rtn
from landscape.quant.formats import make_grid
from landscape.quant.result import QuantResult
from landscape.weights import Base, quantizable_layers, weight_matrix


# ------------------------------------------------------------------------------- the test's own packer
def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer ``values`` ``(count, columns)`` along axis 0 into int32 words, value ``k`` at bits
    ``k * bits ..`` of one little-endian stream per column (a value may straddle two words)."""
    count, columns = values.shape
    words = np.zeros(((count * bits + 31) // 32, columns), dtype=np.uint64)
    for k in range(count):
        for b in range(bits):
            position = k * bits + b
            bit = (values[k].astype(np.uint64) >> np.uint64(b)) & np.uint64(1)
            words[position // 32] |= bit << np.uint64(position % 32)
    return words.astype(np.uint32).view(np.int32)


def gptq_quantize(w0: torch.Tensor, bits: int, group: int, g_idx: np.ndarray, scale_dtype=np.float16):
    """GPTQ-style asymmetric min-max codes of one ``(out, in)`` weight on the groups ``g_idx``: codes
    ``(in, out)``, zeros and scales ``(groups, out)`` (scales rounded to ``scale_dtype``)."""
    w = w0.double().numpy()
    n_groups, qmax = int(g_idx.max()) + 1, 2 ** bits - 1
    scales = np.zeros((n_groups, w.shape[0]))
    zeros = np.zeros((n_groups, w.shape[0]), dtype=np.int64)
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        scales[g] = ((hi - lo) / qmax).astype(scale_dtype)
        zeros[g] = np.clip(np.round(-lo / scales[g]), 1, qmax)  # >= 1: v1 stores zero - 1
    codes = np.clip(np.round(w.T / scales[g_idx] + zeros[g_idx]), 0, qmax).astype(np.int64)
    return codes, zeros, scales.astype(scale_dtype)


def write_checkpoint(directory: Path, model, layers: dict, bits: int, group: int, version: str,
                     desc_act: bool = False, method: str = "gptq", extra_tensors: bool = True) -> None:
    """A GPTQ-packed checkpoint folder: ``layers`` maps names to (codes, zeros, scales, g_idx)."""
    directory.mkdir(parents=True)
    tensors = {}
    if extra_tensors:  # the full-precision rest of the model, as a tool saves it
        quantized = {f"{n}.weight" for n in layers}
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                   if k not in quantized and "lm_head" not in k}
    for name, (codes, zeros, scales, g_idx) in layers.items():
        stored = zeros - 1 if version == "gptq" else zeros
        tensors[f"{name}.qweight"] = torch.from_numpy(pack_stream(codes, bits))
        tensors[f"{name}.qzeros"] = torch.from_numpy(np.ascontiguousarray(pack_stream(stored.T, bits).T))
        tensors[f"{name}.scales"] = torch.from_numpy(np.ascontiguousarray(scales))
        tensors[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    save_file(tensors, directory / "model.safetensors")
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": method, "bits": bits, "group_size": group, "sym": False,
                                     "desc_act": desc_act, "checkpoint_format": version}
    (directory / "config.json").write_text(json.dumps(config))


def independent_dequantization(codes, zeros, scales, g_idx) -> torch.Tensor:
    """``W[o, i] = scales[g, o] * (codes[i, o] - zeros[g, o])``, ``g = g_idx[i]``, in float64, by loop."""
    n_in, n_out = codes.shape
    w = np.zeros((n_out, n_in))
    for i in range(n_in):
        g = g_idx[i]
        w[:, i] = scales[g].astype(np.float64) * (codes[i] - zeros[g])
    return torch.from_numpy(w)


def act_order_groups(n_in: int, group: int, seed: int) -> np.ndarray:
    """Act-order group indices: the columns in a random order, ``group`` consecutive ones per group."""
    order = np.random.default_rng(seed).permutation(n_in)
    g_idx = np.empty(n_in, dtype=np.int64)
    g_idx[order] = np.arange(n_in) // group
    return g_idx


# ------------------------------------------------------------------------------------------------ tests
def test_unpacking_equals_the_test_packer_for_every_width():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        values = rng.integers(0, 2 ** bits, size=(64, 5))
        packed = torch.from_numpy(pack_stream(values, bits))
        assert torch.equal(unpack_rows(packed, bits, 64), torch.from_numpy(values)), bits


@pytest.mark.parametrize("bits", [4, 3])
def test_v1_and_v2_import_the_independent_dequantization(tmp_path, bits):
    model = tiny_model("llama", seed=0)
    base = Base(model, "tiny-llama")
    layers = quantizable_layers(model)
    packed, expected = {}, {}
    for k, (name, module) in enumerate(layers.items()):
        w0 = weight_matrix(module).detach()
        g_idx = act_order_groups(w0.shape[1], 16, seed=k)
        codes, zeros, scales = gptq_quantize(w0, bits, 16, g_idx)
        packed[name] = (codes, zeros, scales, g_idx)
        expected[name] = independent_dequantization(codes, zeros, scales, g_idx)
    results = {}
    for version in ("gptq", "gptq_v2"):
        write_checkpoint(tmp_path / version, model, packed, bits, 16, version, desc_act=True)
        results[version] = import_checkpoint(base, tmp_path / version)
    for version, result in results.items():
        assert set(result.weights) == set(layers)
        for name, w in result.weights.items():
            torch.testing.assert_close(w.double(), expected[name], rtol=0, atol=1e-6)
        assert result.format is None and result.label == f"gptq-packed int{bits}-g16 (off our grid)"
        grid = result.extra["checkpoint_grid"]
        assert (grid["bits"], grid["group_size"], grid["desc_act"], grid["checkpoint_format"]) == \
            (bits, 16, True, version)
        assert not grid["on_our_grid"] and grid["v1_top_code_zeros"] == 0
        assert result.base_fingerprint == base.fingerprint(list(layers))


def test_a_checkpoint_packed_from_our_grid_comes_back_on_it(tmp_path):
    model = tiny_model("opt", seed=0)
    base = Base(model, "tiny-opt")
    ours = rtn(base, "int4-g16")
    packed = {}
    for name, w in ours.weights.items():
        grid = make_grid(weight_matrix(quantizable_layers(model)[name]).detach(), "int4-g16", name)
        codes = grid.quantize(w).t().numpy().astype(np.int64)  # (in, out)
        g_idx = np.arange(w.shape[1]) // 16
        zeros, scales = grid.zero.t().numpy().astype(np.int64), grid.scale.t().numpy().astype(np.float32)
        packed[name] = (codes, zeros, scales, g_idx)
    write_checkpoint(tmp_path / "ckpt", model, packed, 4, 16, "gptq_v2")
    result = import_checkpoint(base, tmp_path / "ckpt")
    assert result.format is not None and result.format.name == "int4-g16"
    assert result.label == "gptq-packed int4-g16" and result.extra["checkpoint_grid"]["on_our_grid"]
    for name, w in ours.weights.items():
        torch.testing.assert_close(result.weights[name], w, rtol=0, atol=1e-6)
    result.check_grid(base)  # what compare, radius and scan check on load
    assert result.storage_bits() == ours.storage_bits()


def test_a_checkpoint_of_another_base_is_refused_with_both_fingerprints(tmp_path):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    packed = {}
    for name, module in quantizable_layers(model).items():
        w0 = weight_matrix(module).detach()
        g_idx = np.arange(w0.shape[1]) // 16
        packed[name] = (*gptq_quantize(w0, 4, 16, g_idx), g_idx)
    write_checkpoint(tmp_path / "full", model, packed, 4, 16, "gptq")
    both = r"another base.*fingerprint [0-9a-f]{16}, the base's [0-9a-f]{16}"
    with pytest.raises(CheckpointError, match=both):
        import_checkpoint(Base(other, "other"), tmp_path / "full")
    write_checkpoint(tmp_path / "packed-only", model, packed, 4, 16, "gptq", extra_tensors=False)
    with pytest.raises(CheckpointError, match=r"not a quantized copy of the base 'other': cosine"):
        import_checkpoint(Base(other, "other"), tmp_path / "packed-only")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama directory with a tokenizer, as ``save_pretrained`` writes it."""
    return saved_tiny_llama(tmp_path_factory.mktemp("import") / "my-llama")


def packed_from(model, bits=4, group=16) -> dict:
    packed = {}
    for name, module in quantizable_layers(model).items():
        w0 = weight_matrix(module).detach()
        g_idx = np.arange(w0.shape[1]) // group
        packed[name] = (*gptq_quantize(w0, bits, group, g_idx), g_idx)
    return packed


def test_the_cli_saves_a_result_whose_displacement_is_the_checkpoints(model_dir, tmp_path, capsys):
    from landscape.models import load_model

    lm = load_model(str(model_dir))
    packed = packed_from(lm.model)
    write_checkpoint(tmp_path / "ckpt", lm.model, packed, 4, 16, "gptq")
    out = tmp_path / "runs" / "imported"
    assert cli_main(["import", str(model_dir), str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert "gptq-packed int4-g16 (off our grid)" in capsys.readouterr().out
    saved = QuantResult.load(out, lm.base.fingerprint(list(packed)))
    d = displacement_direction(lm.base, str(out))
    for name, (codes, zeros, scales, g_idx) in packed.items():
        w0 = weight_matrix(quantizable_layers(lm.model)[name]).detach().double()
        torch.testing.assert_close(saved.weights[name].double(), independent_dequantization(
            codes, zeros, scales, g_idx), rtol=0, atol=1e-6)
        torch.testing.assert_close(d.tensors[name].double(), saved.weights[name].double() - w0, rtol=0,
                                   atol=1e-6)
    assert cli_main(["import", str(model_dir), str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "awq"}, r"quant_method 'awq' is not one this importer reads; accepted: \('gptq', "
                              r"'compressed-tensors'\)"),
    ({"bits": 5}, r"bits 5 has no GPTQ packing this importer reads; accepted: \(2, 3, 4, 8\)"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin' is a packing this importer does not read"),
    ({"group_size": 0}, r"group_size 0; accepted: -1 \(per channel\) or a positive integer"),
])
def test_unknown_packings_are_refused_before_anything_is_written(model_dir, tmp_path, capsys, change,
                                                                 message):
    from landscape.models import load_model

    lm = load_model(str(model_dir))
    write_checkpoint(tmp_path / "ckpt", lm.model, packed_from(lm.model), 4, 16, "gptq")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "r"
    capsys.readouterr()  # the test's own model loading
    assert cli_main(["import", str(model_dir), str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()
