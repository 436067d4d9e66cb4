"""Passes over a layer a block of rows at a time (``landscape.weights.row_blocks``): the fingerprint,
``||w0||``, direction inner products and perturbed points of a layer larger than a block equal the whole-layer
computations (so a 7B model's wide layers cost a block's float32 / float64 temporaries, not their own)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from conftest import random_tokens, tiny_model

import landscape.weights as weights
from landscape.engine.directions import dot, orthogonalize, random_direction
from landscape.engine.perturb import NLLObjective, Perturbation
from landscape.weights import layer_weights, quantizable_layers, row_blocks, weights_fingerprint, weights_norm


def test_blocks_are_views_of_whole_rows_that_cover_the_layer_aligned_to_64_elements():
    w = torch.randn(37, 24)
    blocks = row_blocks(w, elements=100)
    assert len(blocks) > 2
    assert torch.equal(torch.cat(blocks), w)
    assert all(b.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for b in blocks)  # views
    assert all(b.numel() % 64 == 0 for b in blocks[:-1])  # 8 rows of 24: fewest rows of 64k elements
    assert all(b.numel() <= 200 for b in row_blocks(torch.randn(37, 32), elements=200))
    wide = torch.randn(5, 1024)  # a row wider than a block: one row per block
    assert [b.shape[0] for b in row_blocks(wide, elements=100)] == [1] * 5
    assert row_blocks(w, elements=w.numel())[0] is w  # a layer no larger than a block is passed whole


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements: every layer of the tiny models is split into many."""
    monkeypatch.setattr(weights, "ROW_BLOCK_ELEMENTS", 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_fingerprint_norm_and_inner_product_equal_whole_layer_computations(small_blocks, dtype):
    model = tiny_model("llama", dtype=dtype)
    names = list(quantizable_layers(model))
    w0 = layer_weights(model, names)
    assert all(len(row_blocks(w)) > 1 for w in w0.values())
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(w0[n].float().numpy().tobytes())
    assert weights_fingerprint(model, names) == h.hexdigest()[:16]
    expected = math.sqrt(sum(float(w.double().pow(2).sum()) for w in w0.values()))
    assert weights_norm(model, names) == pytest.approx(expected, rel=1e-12)
    u, v = random_direction(model, 1, streamed=True), random_direction(model, 2)
    expected_dot = sum(float((u[n].double() * v[n].double()).sum()) for n in names)
    assert dot(u, v) == pytest.approx(expected_dot, rel=1e-12)
    assert dot(u, u) == pytest.approx(sum(float(u[n].double().pow(2).sum()) for n in names), rel=1e-12)


def test_a_bf16_point_formed_block_by_block_is_the_float32_sum_rounded_once(small_blocks):
    model = tiny_model("llama", dtype=torch.bfloat16)
    u, v = random_direction(model, 1), random_direction(model, 2)
    w0 = layer_weights(model, u.names)
    a, b = 0.37, -1.9
    with Perturbation(model, [u, v]) as perturbation:
        perturbation.move_to([a, b])
        for n in u.names:
            expected = ((w0[n].float() + u[n].float() * a) + v[n].float() * b).to(torch.bfloat16)
            assert torch.equal(weights.layer_weights(model, [n])[n], expected), n
    assert all(torch.equal(weights.layer_weights(model, [n])[n], w0[n]) for n in u.names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_streamed_blocked_scan_equals_the_resident_whole_layer_one(dtype, monkeypatch):
    model = tiny_model("llama", dtype=dtype)
    tokens = random_tokens(4, 16)
    u = random_direction(model, 1, streamed=True)
    v = orthogonalize(random_direction(model, 2, streamed=True), u).unit()
    points = [(0.0, 0.0), (0.7, -0.3), (-2.0, 1.5)]
    resident = Perturbation(model, [u, v])
    expected = [resident.measure(p, [NLLObjective(tokens, 2)])["nll"] for p in points]
    monkeypatch.setattr(weights, "ROW_BLOCK_ELEMENTS", 64)
    with Perturbation(model, [u, v], streamed=True) as streamed:
        assert [streamed.measure(p, [NLLObjective(tokens, 2)])["nll"] for p in points] == expected
    assert len(set(expected)) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_random_direction_drawn_block_by_block_is_the_one_drawn_whole(dtype, monkeypatch):
    """Regenerating a layer a block of rows at a time from its seed's stream gives the numbers of one draw of
    the whole layer: directions stored as seeds replay the same whatever the block size."""
    model = tiny_model("llama", dtype=dtype)
    whole = random_direction(model, 3, normalization="none")
    monkeypatch.setattr(weights, "ROW_BLOCK_ELEMENTS", 64)
    blocked = random_direction(model, 3, normalization="none", streamed=True)
    assert all(len(row_blocks(whole[n])) > 1 for n in whole.names)
    assert all(torch.equal(blocked[n], whole[n]) for n in whole.names)
    assert all(blocked[n].dtype == dtype for n in whole.names)
