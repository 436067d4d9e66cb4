"""Model loading and quantizable-layer discovery on tiny GPT-2, OPT and Llama models (no downloads)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from landscape.models import ModelNotFoundError, builtin_model_names, load_model
from landscape.weights import quantizable_layers, swapped_weights, weight_matrix, weights_fingerprint

EXPECTED_PER_BLOCK = {"gpt2": 4, "opt": 6, "llama": 7}


def test_quantizable_layers_cover_decoder_linears_only(arch):
    model = tiny_model(arch)
    layers = quantizable_layers(model)
    assert len(layers) == 2 * EXPECTED_PER_BLOCK[arch]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert all(m is not emb and m is not head for m in layers.values())
    # forward order: block 0 before block 1
    names = list(layers)
    assert (names.index(next(n for n in names if ".0." in n))
            < names.index(next(n for n in names if ".1." in n)))
    with_extra = quantizable_layers(model, include_embeddings=True, include_lm_head=True)
    assert len(with_extra) == len(layers) + 2


def test_weight_matrix_is_out_by_in_and_writes_through(arch):
    model = tiny_model(arch)
    for name, module in quantizable_layers(model).items():
        w = weight_matrix(module)
        x = torch.randn(3, w.shape[1])
        # y = x W^T (+ bias) in the common orientation, whatever the module type
        bias = module.bias if module.bias is not None else 0
        torch.testing.assert_close(module(x), x @ w.T + bias)
    module = next(iter(quantizable_layers(model).values()))
    with torch.no_grad():
        weight_matrix(module)[0, 0] = 123.0
    assert weight_matrix(module)[0, 0].item() == 123.0


def test_swapped_weights_restores_bit_exactly_even_on_error():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(quantizable_layers(model)))
    new = torch.zeros_like(weight_matrix(model.get_submodule(name)))
    with pytest.raises(RuntimeError):
        with swapped_weights(model, {name: new}):
            assert weight_matrix(model.get_submodule(name)).abs().sum().item() == 0.0
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_swapped_weights_compute_with_the_given_tensors_without_copying_w0(arch):
    """Inside the swap the model equals a copy whose weights were written in (an independent computation);
    the given tensors are used as they are (same storage: nothing copied), views of w0 taken before keep
    reading w0, and on exit every parameter is back on its own storage."""
    import copy

    model = tiny_model(arch)
    layers = quantizable_layers(model)
    gen = torch.Generator().manual_seed(0)
    given = {n: torch.randn(weight_matrix(m).shape, generator=gen) for n, m in layers.items()}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in quantizable_layers(reference).items():
            weight_matrix(m).copy_(given[n])
    w0_views = {n: weight_matrix(m).detach() for n, m in layers.items()}
    w0_values = {n: w.clone() for n, w in w0_views.items()}
    storage = {n: m.weight.data_ptr() for n, m in layers.items()}
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    with swapped_weights(model, given):
        inside = model(input_ids=tokens).logits
        for n, m in layers.items():
            assert weight_matrix(m).data_ptr() == given[n].data_ptr(), n  # the given tensor, not a copy
            assert torch.equal(w0_views[n], w0_values[n]), n
    assert torch.equal(inside, reference(input_ids=tokens).logits)
    for n, m in layers.items():
        assert m.weight.data_ptr() == storage[n] and torch.equal(weight_matrix(m), w0_values[n]), n


def test_swapped_weights_cast_to_the_models_dtype():
    model = tiny_model("llama", dtype=torch.bfloat16)
    name, module = next(iter(quantizable_layers(model).items()))
    given = torch.randn(weight_matrix(module).shape, dtype=torch.float32)
    with swapped_weights(model, {name: given}):
        assert module.weight.dtype == torch.bfloat16
        assert torch.equal(weight_matrix(module), given.to(torch.bfloat16))
    assert given.dtype == torch.float32


def test_swapped_weights_rejects_wrong_shape_and_unknown_layer():
    model = tiny_model("llama")
    name = next(iter(quantizable_layers(model)))
    with pytest.raises(ValueError, match="shape"):
        with swapped_weights(model, {name: torch.zeros(3, 3)}):
            pass
    with pytest.raises(KeyError, match="unknown layer"):
        with swapped_weights(model, {"model.layers.9.nope": torch.zeros(3, 3)}):
            pass


def test_fingerprint_changes_with_weights():
    model = tiny_model("opt")
    fp = weights_fingerprint(model)
    assert fp == weights_fingerprint(model)
    name = next(iter(quantizable_layers(model)))
    with swapped_weights(model, {name: weight_matrix(model.get_submodule(name)) + 1e-3}):
        assert weights_fingerprint(model) != fp
    assert weights_fingerprint(model) == fp


def test_local_directory_loads_through_the_hub_code_path(tmp_path, arch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<eos>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.float64)
    assert loaded.info.architecture == model.config.model_type
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "eager"
    assert next(loaded.model.parameters()).dtype == torch.float64
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1.double(), p2)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("no-such-model-xyz")
    for name in builtin_model_names():
        assert name in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_prepare_model_sets_eval_and_eager():
    from transformers import GPT2Config, GPT2LMHeadModel

    from landscape.models import prepare_model

    model = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    assert model.training
    prepare_model(model)
    assert not model.training and not any(m.training for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.config._attn_implementation == "eager"
