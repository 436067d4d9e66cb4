"""Importing GGUF files (``landscape import BASE FILE.gguf``): a tiny Llama written here with ``gguf``'s
writer (q/k permuted as llama.cpp's converter does, linears in Q4_1 or Q8_0) comes back as the displacement
that a dequantization of the test's own (numpy, from the block layout, q/k permuted back) gives; a GGUF of
another architecture or of another base is refused before anything is written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from landscape.interop import import_checkpoint
from landscape.interop.gptq_packed import CheckpointError
from landscape.weights import Base

gguf = pytest.importorskip("gguf")
BLOCK = 32


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in parts.items()}
    return names


def write_gguf(path, model, qtype: str) -> None:
    """The tiny Llama ``model`` as a GGUF, its linears quantized to ``qtype``."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    kind = gguf.GGMLQuantizationType[qtype]
    for name, tensor in model.state_dict().items():
        w = tensor.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            w = permute(w, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            w = permute(w, cfg.num_key_value_heads)
        if "proj" in name:
            q = gguf.quants.quantize(w, kind)
            writer.add_tensor(gguf_names(cfg.num_hidden_layers)[name], q, raw_shape=q.shape, raw_dtype=kind)
        else:
            writer.add_tensor(gguf_names(cfg.num_hidden_layers)[name], w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantize_blocks(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """The test's own dequantization of Q4_1 (fp16 d, fp16 m, 16 bytes: low nibbles are values 0-15 of the
    block, high nibbles 16-31; w = d q + m) and Q8_0 (fp16 d, 32 int8; w = d q) rows."""
    rows, cols = shape
    size = {"Q4_1": 20, "Q8_0": 34}[qtype]
    blocks = raw.reshape(rows, cols // BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float64)
        return (d[..., None] * q).reshape(rows, cols)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)
    return (d[..., None] * q + m[..., None]).reshape(rows, cols)


def expected_weights(path, model) -> dict[str, torch.Tensor]:
    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    by_gguf = {t.name: t for t in reader.tensors}
    out = {}
    for name, g in gguf_names(cfg.num_hidden_layers).items():
        if "proj" not in name:
            continue
        t = by_gguf[g]
        rows, cols = int(t.shape[1]), int(t.shape[0])
        w = dequantize_blocks(np.asarray(t.data), t.tensor_type.name, (rows, cols))
        if name.endswith("q_proj.weight"):
            w = unpermute(w, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            w = unpermute(w, cfg.num_key_value_heads)
        out[name.removesuffix(".weight")] = torch.from_numpy(w)
    return out


@pytest.mark.parametrize("qtype, nearest", [("Q4_1", "int4-g32-fz"), ("Q8_0", "int8-g32-sym")])
def test_gguf_import_equals_a_dequantization_of_its_blocks(tmp_path, qtype, nearest):
    model = tiny_model("llama", seed=0)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, qtype)
    base = Base(model, "tiny-llama")
    result = import_checkpoint(base, path)
    expected = expected_weights(path, model)
    assert set(result.weights) == set(expected) and len(expected) == 14
    for name, w in result.weights.items():
        torch.testing.assert_close(w.double(), expected[name], rtol=0, atol=1e-6)
    grid = result.extra["checkpoint_grid"]
    assert grid["tensor_types"] == {qtype: 14} and grid["nearest_format"] == nearest
    assert result.label.startswith("gguf ")
    assert result.base_fingerprint == base.fingerprint(list(result.weights))


def test_a_gguf_of_its_own_dequantized_weights_lies_on_our_grid(tmp_path):
    """SmolLM2's situation: the base is the GGUF's dequantization, so importing it again is a zero
    displacement on int4-g32-fz, the Q4_1 lattice."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_model("llama", seed=0), "Q4_1")
    dequantized = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                       dtype=torch.float32)
    result = import_checkpoint(Base(dequantized, "from-gguf"), path)
    assert result.format is not None and result.format.name == "int4-g32-fz", result.extra
    assert result.label == "gguf int4-g32-fz"
    state = dequantized.state_dict()
    assert all(torch.equal(w, state[f"{n}.weight"]) for n, w in result.weights.items())


def test_a_gguf_of_another_architecture_or_base_is_refused(tmp_path):
    model = tiny_model("llama", seed=0)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, "Q8_0")
    with pytest.raises(CheckpointError, match=r"GGUF of architecture 'llama'; the base is a 'gpt2' model"):
        import_checkpoint(Base(tiny_model("gpt2"), "gpt2"), path)
    both = r"another base.*fingerprint [0-9a-f]{16}, the base's [0-9a-f]{16}"
    with pytest.raises(CheckpointError, match=both):
        import_checkpoint(Base(tiny_model("llama", seed=1), "other"), path)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(CheckpointError, match=r"broken\.gguf is not a readable GGUF file"):
        import_checkpoint(Base(model, "m"), tmp_path / "broken.gguf")
