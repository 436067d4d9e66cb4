"""Data-free LLM-QAT: the generator against uncached argmax decoding, and the distillation it trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from landscape.quant.formats import make_grid
from landscape.quant.llm_qat import GenerationSettings, generate_training_text, llm_qat
from landscape.quant.qaft import FinetuneSettings
from landscape.weights import layer_weights, swapped_weights


def argmax_continuation(model, prefix: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole prefix every step (no key-value cache)."""
    tokens = prefix.clone()
    with torch.no_grad():
        for _ in range(n_new):
            next_token = model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def kl_to_teacher(model, weights, tokens) -> float:
    """Token-mean KL(p_w0 || p_weights) over every predicted position of ``tokens``."""
    with torch.no_grad():
        teacher = F.log_softmax(model(input_ids=tokens).logits[:, :-1], dim=-1)
        with swapped_weights(model, weights):
            student = F.log_softmax(model(input_ids=tokens).logits[:, :-1], dim=-1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_generated_text_is_deterministic_given_the_seed():
    model = tiny_model("gpt2")
    a = generate_training_text(model, GenerationSettings(10, 5, seed=3, batch_size=2), progress=False)
    b = generate_training_text(model, GenerationSettings(10, 5, seed=3, batch_size=2), progress=False)
    c = generate_training_text(model, GenerationSettings(10, 5, seed=4, batch_size=2), progress=False)
    assert torch.equal(a.tokens, b.tokens) and a.content_hash == b.content_hash
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (5, 10) and a.corpus == "generated" and a.seed == 3
    assert torch.equal(a.tokens[:, 0], torch.randint(0, model.config.vocab_size, (5,),
                                                     generator=torch.Generator().manual_seed(3)))


def test_first_greedy_tokens_are_argmax_decoding(arch):
    model = tiny_model(arch, torch.float64)
    text = generate_training_text(model, GenerationSettings(12, 4, greedy_tokens=3, seed=1, batch_size=3),
                                  progress=False)
    expected = argmax_continuation(model, text.tokens[:, :1], 3)
    assert torch.equal(text.tokens[:, :4], expected)
    sampled = text.tokens[:, 4:]
    assert not torch.equal(sampled, argmax_continuation(model, text.tokens[:, :4], 8)[:, 4:])


def test_all_greedy_generation_equals_uncached_decoding():
    model = tiny_model("llama", torch.float64)
    text = generate_training_text(model, GenerationSettings(10, 3, greedy_tokens=9, seed=0), progress=False)
    assert torch.equal(text.tokens, argmax_continuation(model, text.tokens[:, :1], 9))


def test_start_tokens_respect_vocab_size():
    model = tiny_model("opt")
    text = generate_training_text(model, GenerationSettings(3, 40, greedy_tokens=1, vocab_size=5, seed=0,
                                                            batch_size=40), progress=False)
    assert set(text.tokens[:, 0].tolist()) <= set(range(5)) and len(set(text.tokens[:, 0].tolist())) == 5


def test_llm_qat_distils_towards_the_full_precision_model_on_the_grid():
    model = tiny_model("gpt2")
    with torch.no_grad():  # sharper predictions than the random init, so that int3 rounding matters
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    w0 = layer_weights(model)
    text = generate_training_text(model, GenerationSettings(16, 8, seed=0), progress=False)
    result = llm_qat(model, "int3", FinetuneSettings(lr=1e-3, steps=16, batch_size=4, distill_weight=1.0),
                     GenerationSettings(16), text=text, progress=False)
    rtn = {n: make_grid(w, "int3").round(w) for n, w in w0.items()}
    assert kl_to_teacher(model, result.weights, text.tokens) < kl_to_teacher(model, rtn, text.tokens)
    assert all(make_grid(w0[n], "int3").contains(w) for n, w in result.weights.items())
    assert result.method == "llm-qat" and result.settings["distill_weight"] == 1.0
    assert (result.calibration["corpus"] == "generated"
            and result.calibration["data_hash"] == text.content_hash)
    assert all(torch.equal(layer_weights(model)[n], w0[n]) for n in w0)


def test_llm_qat_generates_its_own_text_with_the_sequence_budget():
    model = tiny_model("llama")
    result = llm_qat(model, "int4", FinetuneSettings(steps=1, batch_size=4, distill_weight=1.0),
                     GenerationSettings(8, n_sequences=4, seed=2), progress=False)
    again = generate_training_text(model, GenerationSettings(8, 4, seed=2), progress=False)
    assert result.calibration["n_segments"] == 4 and result.calibration["data_hash"] == again.content_hash


@pytest.mark.parametrize("bad",
                         [dict(seq_len=65), dict(seq_len=1), dict(greedy_tokens=8), dict(temperature=0.0),
                          dict(vocab_size=0), dict(vocab_size=98), dict(n_sequences=0), dict(lr=-1.0),
                          dict(steps=0), dict(activations=16), dict(fmt="int9"), dict(batch_size=5)])
def test_bad_settings_are_refused_before_generating(bad):
    model = tiny_model("gpt2")  # context 64, vocabulary 97
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    kwargs = dict(fmt="int4", seq_len=8, n_sequences=4, steps=1) | bad
    generation_keys = ("seq_len", "n_sequences", "greedy_tokens", "temperature", "vocab_size")
    generation = {k: kwargs.pop(k) for k in generation_keys if k in kwargs}
    with pytest.raises(ValueError):
        llm_qat(model, kwargs.pop("fmt"), FinetuneSettings(distill_weight=1.0, **kwargs),
                GenerationSettings(**generation), progress=False)
    assert calls[0] == 0
