"""GPTQ on layers that share an input (q/k/v, gate/up) solved as one stacked problem: it must give every
layer exactly what solving it alone gives, and the driver must hand each input group to the solver once."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.quant import GPTQSettings, Grid, gptq, gptq_group, gptq_layer, make_grid
from landscape.quant.capture import per_layer, quantize_block_by_block
from landscape.weights import Base, quantizable_layers


def shared_input_problem(rows: tuple[int, ...], in_f: int = 32, n_tokens: int = 80, seed: int = 0):
    """Weights of several layers (``(rows[i], in)`` each) and one correlated input's H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(r, in_f, generator=g, dtype=torch.float64) * (1 + i) for i, r in enumerate(rows)]
    mix = torch.eye(in_f, dtype=torch.float64) + 0.5 * torch.randn(in_f, in_f, generator=g,
                                                                   dtype=torch.float64)
    x = torch.randn(n_tokens, in_f, generator=g, dtype=torch.float64) @ mix
    x[:, 3] = 0  # one input never active
    return ws, 2.0 / n_tokens * x.T @ x


@pytest.mark.parametrize("fmt", ["int4", "int3-g8", "int4-sym", "int4-tensor", "mxint4-8"])
@pytest.mark.parametrize("act_order", [True, False])
def test_stacked_group_equals_each_layer_solved_alone(fmt, act_order):
    ws, hessian = shared_input_problem((12, 4, 4))  # q, k, v with grouped-query k/v
    grids = [make_grid(w, fmt) for w in ws]
    settings = GPTQSettings(act_order=act_order, block_size=8)
    together = gptq_group(ws, hessian, grids, settings, names=["q", "k", "v"])
    for w, grid, (w_q, info) in zip(ws, grids, together, strict=True):
        alone, alone_info = gptq_layer(w, hessian, grid, settings)
        assert w_q.shape == w.shape
        assert torch.equal(w_q, alone)
        assert grid.contains(w_q)
        assert info == alone_info
    assert not torch.equal(together[0][0], grids[0].round(ws[0]))  # GPTQ moved something: not plain RTN


def test_stack_rows_keeps_each_rows_grid_and_refuses_mismatched_grids():
    ws, _ = shared_input_problem((5, 3))
    grids = [make_grid(w, "int3-g8") for w in ws]
    stacked = Grid.stack_rows(grids)
    both = torch.cat(ws)
    assert torch.equal(stacked.round(both), torch.cat([g.round(w) for g, w in zip(grids, ws)]))
    with pytest.raises(ValueError, match="int3-g8.*int4"):
        Grid.stack_rows([grids[0], make_grid(ws[1], "int4")])
    with pytest.raises(ValueError, match="cannot stack"):
        Grid.stack_rows([grids[0], make_grid(torch.randn(3, 16, dtype=torch.float64), "int3-g8")])


def test_driver_hands_each_input_group_to_the_solver_once():
    model = tiny_model("llama")
    calib = random_tokens(2, 16, seed=3)
    seen = []

    def solve(names, w0s, hessian):
        seen.append([n.split(".")[-1] for n in names])
        assert all(hessian.shape == (w.shape[1], w.shape[1]) for w in w0s)
        return [(w.clone(), None) for w in w0s]

    quantize_block_by_block(model, calib, list(quantizable_layers(model)), solve, progress=False)
    per_block = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert seen == per_block * (len(seen) // 4) and len(seen) >= 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_whole_model_gptq_equals_one_layer_at_a_time(arch, true_sequential):
    """The toolkit's GPTQ (groups stacked) against the same driver solving one layer at a time."""
    model = tiny_model(arch)
    calib = random_tokens(4, 16, seed=5)
    settings = GPTQSettings(true_sequential=true_sequential, block_size=16)
    ours = gptq(Base(model, "tiny"), calib, "int3", settings, progress=False)

    def one_layer(name, w0, hessian):
        return gptq_layer(w0, hessian, make_grid(w0, "int3", name), settings, name=name)

    alone = quantize_block_by_block(model, calib, list(ours.weights), per_layer(one_layer),
                                    true_sequential=true_sequential, compute_dtype=settings.hessian_dtype,
                                    progress=False)
    assert all(torch.equal(ours.weights[n], alone[n].weight) for n in ours.weights)
    assert ours.layer_mse == {n: s.output_mse for n, s in alone.items()}
