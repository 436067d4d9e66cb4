"""True-sequential quantization in one pass per block (forwards paused at each input group's first layer)
against the plain algorithm built from replays: one :func:`run_block` per group, each stopped once the
group has its input, and one more for the block's outputs. They must agree bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.quant import GPTQSettings, gptq
from landscape.quant.capture import (
    capture_block_inputs,
    input_groups,
    run_block,
    solve_in_one_pass,
)
from landscape.weights import Base, decoder_blocks, quantizable_layers, weight_matrix


def _round_group(layers, log):
    """A solver that moves every weight of the group (so later groups' inputs change) and logs H."""
    def solve(group, hessian):
        log.append((list(group), hessian.clone()))
        for name in group:
            w = weight_matrix(layers[name]).detach()
            w.copy_(torch.round(w * 8) / 8)

    return solve


def _block_problem(arch: str):
    model = tiny_model(arch, layers=1)
    calls = capture_block_inputs(model, random_tokens(5, 12, seed=1), batch_size=2)  # calls of 2, 2, 1
    block = decoder_blocks(model)[0]
    layers = {n: m for n, m in quantizable_layers(model).items()}
    return model, block, calls, layers, input_groups(block, layers, calls[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("keep_outputs", [True, False])
def test_one_pass_equals_one_replay_per_group(arch, keep_outputs):
    model, block, calls, layers, groups = _block_problem(arch)
    w0 = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
    assert len(groups) >= 3 and len(calls) == 3
    _, at_w0 = run_block(block, calls, {n: layers[n] for n in groups[-1]}, torch.float64)

    replayed: list = []
    solve = _round_group(layers, replayed)
    for group in groups:
        _, hessians = run_block(block, calls, {n: layers[n] for n in group}, torch.float64,
                                keep_outputs=False)
        solve(group, hessians[group[0]])
    expected_outputs, _ = run_block(block, calls)
    expected_weights = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}

    for name, m in layers.items():  # back to w0 for the one-pass run
        weight_matrix(m).detach().copy_(w0[name])
    one_pass: list = []
    threads_before = threading.active_count()
    outputs = solve_in_one_pass(block, calls, layers, groups, _round_group(layers, one_pass), torch.float64,
                                keep_outputs=keep_outputs)

    assert threading.active_count() == threads_before  # every call's thread has ended
    assert [g for g, _ in one_pass] == [g for g, _ in replayed] == [list(g) for g in groups]
    for (_, h_one), (_, h_replayed) in zip(one_pass, replayed, strict=True):
        assert h_one.dtype == torch.float64 and torch.equal(h_one, h_replayed)
    # the last group's Hessian is not that of w0's inputs (the earlier groups' rounding reached it)
    assert not torch.equal(at_w0[groups[-1][0]], one_pass[-1][1])
    assert all(torch.equal(weight_matrix(m).detach(), expected_weights[n]) for n, m in layers.items())
    if keep_outputs:
        assert len(outputs) == len(calls)
        for got, want in zip(outputs, expected_outputs, strict=True):
            assert torch.equal(got.hidden, want.hidden)
            assert got.args[1:] == want.args[1:] and got.kwargs.keys() == want.kwargs.keys()
    else:
        assert outputs == []


def test_a_failing_solver_stops_every_paused_forward_and_raises_its_error():
    _, block, calls, layers, groups = _block_problem("llama")
    threads_before = threading.active_count()

    def fail(group, hessian):
        if group == list(groups[1]):
            raise RuntimeError("solver broke on the second group")

    with pytest.raises(RuntimeError, match="second group"):
        solve_in_one_pass(block, calls, layers, groups, fail)
    assert threading.active_count() == threads_before


def test_an_error_inside_the_block_reaches_the_caller():
    _, block, calls, layers, groups = _block_problem("llama")
    last = layers[groups[-1][0]]
    def refuse(module, args):
        raise ValueError("bad input")

    handle = last.register_forward_pre_hook(refuse)
    try:
        with pytest.raises(ValueError, match="bad input"):
            solve_in_one_pass(block, calls, layers, groups, lambda group, hessian: None)
    finally:
        handle.remove()


def test_a_group_that_a_forward_never_reaches_is_named():
    _, block, calls, layers, groups = _block_problem("llama")
    stray = torch.nn.Linear(4, 4)  # watched, but never called by the block
    with pytest.raises(ValueError, match=r"\['stray'\] received no input"):
        solve_in_one_pass(block, calls, {**layers, "stray": stray}, [*groups, ["stray"]],
                          lambda group, hessian: None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_in_one_pass_equals_gptq_with_replays(arch):
    """The whole-model GPTQ (several blocks: the outputs of a block paused and resumed feed the next)."""
    model = tiny_model(arch)
    calib = random_tokens(5, 16, seed=7)
    fast = gptq(Base(model, "tiny"), calib, "int3", GPTQSettings(block_size=16), batch_size=2, progress=False)
    slow = gptq(Base(model, "tiny"), calib, "int3", GPTQSettings(block_size=16, one_pass=False), batch_size=2,
                progress=False)
    assert len(fast.weights) == len(quantizable_layers(model)) and len(decoder_blocks(model)) >= 2
    assert all(torch.equal(fast.weights[n], slow.weights[n]) for n in slow.weights)
    assert fast.layer_mse == slow.layer_mse
    with pytest.raises(ValueError, match="one_pass must be True or False"):
        GPTQSettings(one_pass="yes")


def test_gptq_hands_the_heap_back_after_each_input_group_when_groups_take_long(monkeypatch):
    """The driver releases the heap's freed memory after each solved group, at most once per interval: with a
    zero interval (a model whose groups take seconds, SmolLM2) once per group, the same weights bit for bit;
    with the default interval, a toy's millisecond groups pay at most one release."""
    from landscape import memory
    from landscape.quant import capture

    model = tiny_model("llama")
    calib = random_tokens(5, 16, seed=7)
    settings = GPTQSettings(block_size=16)
    calls: list[int] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    toy = gptq(Base(model, "tiny"), calib, "int3", settings, batch_size=2, progress=False)
    assert len(calls) <= 1
    calls.clear()
    monkeypatch.setattr(capture, "PeriodicRelease", lambda: memory.PeriodicRelease(interval_s=0.0))
    every = gptq(Base(model, "tiny"), calib, "int3", settings, batch_size=2, progress=False)
    assert len(calls) == 4 * len(decoder_blocks(model))  # a Llama block: q/k/v, o, gate/up, down
    assert all(torch.equal(toy.weights[n], every.weights[n]) for n in toy.weights)
