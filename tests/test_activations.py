"""Activation and KV-cache fake quantization, checked against per-row hand computations on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.quant.activations import (
    ActivationQuant,
    ActivationQuantError,
    fake_quant_activations,
    kv_projections,
    parse_bit_setting,
    quantized_activations,
)
from landscape.weights import get_layer, quantizable_layers, weight_matrix


def hand_fake_quant_rows(x2d: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Row-by-row min-max fake quantization written out with Python scalars (no landscape code)."""
    out = torch.empty_like(x2d)
    for i, row in enumerate(x2d.tolist()):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = max(abs(v) for v in row) / qmax or 1.0
            out[i] = torch.tensor([min(max(round(v / scale), -qmax), qmax) * scale for v in row],
                                  dtype=x2d.dtype)
        else:
            qmax = 2**bits - 1
            lo, hi = min(min(row), 0.0), max(max(row), 0.0)
            scale = (hi - lo) / qmax or 1.0
            zero = round(-lo / scale)
            out[i] = torch.tensor([(min(max(round(v / scale) + zero, 0), qmax) - zero) * scale for v in row],
                                  dtype=x2d.dtype)
    return out


def hand_fake_quant(x: torch.Tensor, spec: ActivationQuant) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]) if spec.granularity == "token" else x.reshape(1, -1)
    return hand_fake_quant_rows(rows.double(), spec.bits, spec.symmetric).to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_fake_quant_matches_hand_computation_and_passes_gradient_straight_through(granularity, symmetric):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
         * torch.linspace(0.1, 3, 7)).requires_grad_(True)
    spec = ActivationQuant(4, granularity, symmetric)
    y = fake_quant_activations(x, spec)
    assert torch.allclose(y, hand_fake_quant(x.detach(), spec), rtol=0, atol=1e-12)
    assert not torch.equal(y, x)
    rows = y.detach().reshape(-1, 7) if granularity == "token" else y.detach().reshape(1, -1)
    assert all(len(set(r.tolist())) <= 2**4 for r in rows)  # at most 2^bits distinct values per range
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    assert torch.equal(grad, upstream)  # straight-through: d fake_quant(x) / dx = identity


def test_per_token_ranges_do_not_depend_on_other_tokens():
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    spec = ActivationQuant(3)
    alone = fake_quant_activations(x[1:2], spec)
    y = x.clone()
    y[0] *= 100  # a huge neighbour changes a per-tensor range, not a per-token one
    assert torch.equal(fake_quant_activations(y, spec)[1:2], alone)
    assert not torch.equal(fake_quant_activations(y, ActivationQuant(3, "tensor"))[1:2],
                           fake_quant_activations(x, ActivationQuant(3, "tensor"))[1:2])


def test_quantized_linear_inputs_are_what_the_layer_multiplies(arch):
    model = tiny_model(arch, torch.float64)
    tokens = random_tokens(2, 8).tokens
    name = list(quantizable_layers(model))[-1]  # the last MLP projection (mostly positive inputs)
    layer = get_layer(model, name)
    seen: dict[str, torch.Tensor] = {}
    raw = layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    out = layer.register_forward_hook(lambda m, args, y: seen.__setitem__("y", y.detach().clone()))
    spec = ActivationQuant(4)
    try:
        reference = model(input_ids=tokens).logits
        with quantized_activations(model, spec):
            quantized = model(input_ids=tokens).logits
    finally:
        raw.remove(), out.remove()
    x_q = hand_fake_quant(seen["x"], spec)
    expected = x_q @ weight_matrix(layer).detach().T + layer.bias.detach() if layer.bias is not None \
        else x_q @ weight_matrix(layer).detach().T
    assert torch.allclose(seen["y"], expected, rtol=0, atol=1e-10)
    assert not torch.allclose(quantized, reference)
    assert torch.equal(model(input_ids=tokens).logits, reference)  # hooks gone after the block
    assert all(not get_layer(model, n)._forward_pre_hooks for n in quantizable_layers(model))


def test_kv_quantization_rounds_keys_and_values_only(arch):
    model = tiny_model(arch, torch.float64)
    tokens = random_tokens(2, 8).tokens
    spec = ActivationQuant(3, symmetric=True)
    projections = kv_projections(model)
    expected_modules = {"gpt2": ["c_attn"], "opt": ["k_proj", "v_proj"], "llama": ["k_proj", "v_proj"]}[arch]
    assert len(projections) == len(expected_modules) * model.config.num_hidden_layers
    raw: dict[str, torch.Tensor] = {}
    final: dict[str, torch.Tensor] = {}
    handles = [get_layer(model, p.module_name).register_forward_hook(
        lambda m, a, y, n=p.module_name: raw.__setitem__(n, y.detach().clone())) for p in projections]
    try:
        reference = model(input_ids=tokens).logits
        with quantized_activations(model, kv=spec):
            handles += [get_layer(model, p.module_name).register_forward_hook(  # runs after the quantizer
                lambda m, a, y, n=p.module_name: final.__setitem__(n, y.detach().clone()))
                        for p in projections]
            quantized = model(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()
    for p in projections:
        before, after = raw[p.module_name], final[p.module_name]
        width = weight_matrix(get_layer(model, p.module_name)).shape[0]
        if arch == "gpt2":  # [q | k | v]: q untouched, k and v each rounded per token
            e = width // 3
            assert torch.equal(after[..., :e], before[..., :e])
            for lo in (e, 2 * e):
                assert torch.allclose(after[..., lo:lo + e], hand_fake_quant(before[..., lo:lo + e], spec),
                                      atol=1e-12)
        else:
            assert torch.allclose(after, hand_fake_quant(before, spec), rtol=0, atol=1e-12)
        assert not torch.equal(after, before)
    assert not torch.allclose(quantized, reference)


@pytest.mark.parametrize("bad", [1, 9, 16, 0, True, 4.0])
def test_bad_activation_bits_are_refused_before_any_hook(bad):
    model = tiny_model("gpt2")
    with pytest.raises(ActivationQuantError, match="2..8"), quantized_activations(model, bad):
        pass
    with pytest.raises(ActivationQuantError), quantized_activations(model, kv=bad):
        pass
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_bad_granularity_is_refused():
    with pytest.raises(ActivationQuantError, match="granularity"):
        ActivationQuant(8, "channel")


def test_parse_bit_setting():
    s = parse_bit_setting("W4A8KV4")
    assert (s.weights.bits, s.weights.granularity, s.activations.bits, s.kv.bits) == (4, "channel", 8, 4)
    assert s.name == "W4A8KV4"
    s = parse_bit_setting("w8a8", weight_format="int{bits}-sym")
    assert s.weights.symmetric and s.activations.bits == 8 and s.kv is None
    assert parse_bit_setting("W4A16").activations is None
    for bad in ("W4A9", "W4", "A8W4", "W4A8KV1"):
        with pytest.raises(ValueError):
            parse_bit_setting(bad)
