"""NLL and layer MSE against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens, tiny_model

from landscape.data import TokenSet, segments_from_stream
from landscape.objectives import layer_mse, nll
from landscape.weights import quantizable_layers, weight_matrix


def test_nll_equals_independent_cross_entropy_float64(arch):
    model = tiny_model(arch, dtype=torch.float64)
    data = random_tokens(5, 12)
    result = nll(model, data, batch_size=2)
    # independent: one token at a time, log of a softmax computed by hand
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in data.tokens:
            logits = model(input_ids=seq[None]).logits[0]
            for t in range(1, len(seq)):
                z = logits[t - 1]
                total += float(torch.logsumexp(z, 0) - z[seq[t]])
                count += 1
    assert result.convention.n_tokens == count == 5 * 11
    assert result.value == pytest.approx(total / count, rel=1e-12)
    assert result.segment_tokens.tolist() == [11] * 5
    assert result.segment_nll_sum.sum() / result.segment_tokens.sum() == pytest.approx(result.value,
                                                                                       rel=1e-12)


def test_nll_matches_hf_loss_float32(arch):
    model = tiny_model(arch)
    data = random_tokens(4, 16, seed=3)
    result = nll(model, data, batch_size=4)
    with torch.no_grad():
        hf = model(input_ids=data.tokens, labels=data.tokens).loss
    assert result.value == pytest.approx(float(hf), rel=1e-5)


def test_nll_does_not_depend_on_batch_size():
    model = tiny_model("gpt2", dtype=torch.float64)
    data = random_tokens(7, 10)
    assert nll(model, data, batch_size=1).value == pytest.approx(nll(model, data, batch_size=7).value,
                                                                 rel=1e-12)


def test_convention_is_recorded():
    model = tiny_model("llama")
    data = random_tokens(3, 9)
    conv = nll(model, data, model_name="tiny").convention
    assert (conv.model, conv.seq_len, conv.stride, conv.n_segments, conv.n_tokens) == ("tiny", 9, 9, 3, 24)
    assert conv.reduction == "token-mean" and conv.unit == "nats/token"
    assert conv.data_hash == data.content_hash
    assert "24 scored tokens" in conv.describe()


def test_strided_windows_score_every_token_once():
    stream = torch.arange(50).numpy()
    tokens, mask = segments_from_stream(stream, seq_len=10, stride=4)
    scored = tokens[mask].tolist()
    assert scored == sorted(set(scored))  # no token scored twice
    assert scored[0] == 1 and scored == list(range(1, scored[-1] + 1))  # contiguous from the first target


def test_strided_nll_uses_context():
    """With stride < seq_len each scored token sees more context; a brute-force computation agrees."""
    model = tiny_model("gpt2", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 97, (40,), generator=g).numpy()
    tokens, mask = segments_from_stream(stream, seq_len=16, stride=8)
    data = TokenSet(tokens, mask, "rand", "x", 16, 8, "none")
    total, count = 0.0, 0
    with torch.no_grad():
        for seq, m in zip(tokens, mask):
            logp = F.log_softmax(model(input_ids=seq[None]).logits[0, :-1], -1)
            for t in torch.nonzero(m).flatten().tolist():
                total -= float(logp[t - 1, seq[t]])
                count += 1
    assert nll(model, data).value == pytest.approx(total / count, rel=1e-12)


def test_layer_mse_zero_for_identical_weights(arch):
    model = tiny_model(arch)
    data = random_tokens(2, 8)
    layers = quantizable_layers(model)
    same = {n: weight_matrix(m).detach().clone() for n, m in layers.items()}
    assert all(v == 0.0 for v in layer_mse(model, data, same).values())


def test_layer_mse_equals_hand_computation(arch):
    model = tiny_model(arch, dtype=torch.float64)
    data = random_tokens(3, 8)
    name, module = list(quantizable_layers(model).items())[1]
    w0 = weight_matrix(module).detach().clone()
    delta = torch.randn_like(w0) * 0.01
    captured = []
    h = module.register_forward_hook(lambda m, a, o: captured.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=data.tokens)
    h.remove()
    x = captured[0].reshape(-1, w0.shape[1])
    expected = float(((x @ (w0 + delta).T) - (x @ w0.T)).pow(2).mean())
    got = layer_mse(model, data, {name: w0 + delta}, batch_size=3)[name]
    assert got == pytest.approx(expected, rel=1e-10)
    assert torch.equal(weight_matrix(module), w0)  # model untouched


def test_layer_mse_modified_inputs_differ_from_reference_inputs():
    """Perturbing an earlier layer changes what a later layer sees only with inputs='modified'."""
    model = tiny_model("gpt2", dtype=torch.float64)
    data = random_tokens(2, 8)
    names = list(quantizable_layers(model))
    first, last = names[0], names[-1]
    w_first = weight_matrix(model.get_submodule(first)).detach()
    w_last = weight_matrix(model.get_submodule(last)).detach()
    weights = {first: w_first * 1.5, last: w_last + 0.01}
    ref = layer_mse(model, data, weights, inputs="reference")
    mod = layer_mse(model, data, weights, inputs="modified")
    assert ref[first] == pytest.approx(mod[first], rel=1e-12)  # first layer's inputs do not depend on weights
    assert not math.isclose(ref[last], mod[last], rel_tol=1e-6)
    assert torch.equal(weight_matrix(model.get_submodule(first)), w_first)


def test_layer_mse_rejects_bad_input():
    model = tiny_model("gpt2")
    data = random_tokens(1, 4)
    name = next(iter(quantizable_layers(model)))
    with pytest.raises(ValueError, match="shape"):
        layer_mse(model, data, {name: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="inputs"):
        layer_mse(model, data, {}, inputs="both")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nll_sums_in_blocks_of_positions_equal_the_whole_log_softmax_bit_for_bit(dtype, monkeypatch):
    """Without gradients the log-softmax is taken a block of positions at a time (here blocks of 3 positions,
    a remainder and the one-token edge case); the sums are those of one log-softmax over every position, bit
    for bit, and with gradients the same function differentiates as the whole one does."""
    import landscape.objectives as objectives

    generator = torch.Generator().manual_seed(0)
    for b, t, vocab in [(3, 37, 101), (2, 1, 11), (1, 2, 7)]:
        logits = (3 * torch.randn(b, t, vocab, generator=generator, dtype=torch.float64)).to(dtype)
        tokens = torch.randint(0, vocab, (b, t), generator=generator)
        mask = (torch.rand(b, t, generator=generator) > 0.2).to(torch.float32)
        work = torch.float32 if dtype == torch.bfloat16 else dtype
        logp = torch.log_softmax(logits[:, :-1].to(work), dim=-1)  # the whole tensor, by hand
        expected = (-logp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(dim=1)
        monkeypatch.setattr(objectives, "LOG_SOFTMAX_CHUNK", 3 * b * vocab)
        with torch.no_grad():
            assert torch.equal(objectives.nll_sums_from_logits(logits, tokens, mask), expected)
        leaf = logits.detach().to(work).requires_grad_(True)
        grad, = torch.autograd.grad(objectives.nll_sums_from_logits(leaf, tokens, mask).sum(), leaf)
        by_hand = torch.softmax(leaf.detach()[:, :-1], dim=-1)
        by_hand.scatter_add_(-1, tokens[:, 1:, None], -torch.ones_like(by_hand[..., :1]))
        assert torch.allclose(grad[:, :-1], by_hand * mask[:, 1:, None], atol=1e-6)
        assert not grad[:, -1].any()
