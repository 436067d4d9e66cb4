"""Data-free LLM-QAT (Liu et al., 2023): the full-precision model writes its own training text, and the
quantized model is fine-tuned to match the full-precision model's next-token distributions on it.

    starts <- n tokens drawn uniformly from the vocabulary (seeded)
    text   <- continue every start with the full-precision model: the first `greedy_tokens` tokens by
              argmax, the rest sampled from softmax(logits / temperature)
    result <- QAFT on text with the loss KL(p_w0 || p_student)   (distill_weight = 1: logit distillation)

The sequence budget is the calibration budget of the other methods (128 sequences by default, of the same
length), so LLM-QAT, QAFT and GPTQ see the same number of tokens; only their origin differs. The
training loop is :func:`landscape.quant.qaft.finetune` (same grid, optimiser, schedule, data order);
pass ``activations`` / ``kv`` for W4A8KV4-style training as in the LLM-QAT paper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.data import CALIBRATION_SEQUENCES, TokenSet, tokenizer_id
from landscape.quant.activations import ActivationQuant
from landscape.quant.capture import resolve_layers
from landscape.quant.formats import QuantFormat, parse_format
from landscape.quant.qaft import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    FinetuneSettings,
    QAFTError,
    finetune,
)
from landscape.quant.result import QuantResult
from landscape.weights import weights_fingerprint

DEFAULT_GREEDY_TOKENS = 3
DEFAULT_GENERATION_BATCH_SIZE = 16


def _context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _check_generation(model: nn.Module, seq_len: int, n_sequences: int, greedy_tokens: int, temperature: float,
                      vocab_size: int | None, batch_size: int, seed: int) -> int:
    """Validate generation settings (before any work); returns the vocabulary size to draw starts from."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    context = _context_length(model)
    if not is_int(seq_len) or seq_len < 2 or (context and seq_len > context):
        raise QAFTError(f"seq_len must be an integer in 2..{context or 'context length'}, got {seq_len!r}")
    if not is_int(seed):
        raise QAFTError(f"seed must be an integer, got {seed!r}")
    if not is_int(n_sequences) or n_sequences < 1:
        raise QAFTError(f"n_sequences must be an integer >= 1, got {n_sequences!r}")
    if not is_int(greedy_tokens) or not 0 <= greedy_tokens <= seq_len - 1:
        raise QAFTError(f"greedy_tokens must be an integer in 0..seq_len-1={seq_len - 1}, got {greedy_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise QAFTError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise QAFTError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model_vocab = model.get_input_embeddings().num_embeddings
    vocab = model_vocab if vocab_size is None else vocab_size
    if not is_int(vocab) or not 1 <= vocab <= model_vocab:
        raise QAFTError(f"vocab_size must be an integer in 1..{model_vocab} (the model's vocabulary), got {vocab_size!r}")
    return vocab


@torch.no_grad()
def generate_training_text(
    model: nn.Module,
    seq_len: int,
    n_sequences: int = CALIBRATION_SEQUENCES,
    *,
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
    seed: int = 0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
    tokenizer: Any = None,
    progress: bool = True,
) -> TokenSet:
    """LLM-QAT's self-generated training text: ``n_sequences`` sequences of ``seq_len`` tokens from the model.

    Token 0 of each sequence is drawn uniformly from ``0 .. vocab_size - 1`` (default: the model's whole
    vocabulary); tokens ``1 .. greedy_tokens`` are the argmax continuation, the rest are sampled from
    ``softmax(logits / temperature)``. Decoding uses the model's key-value cache. Start tokens and samples
    come from one CPU generator seeded with ``seed`` (probabilities in float64 on the CPU), so the text is
    a deterministic function of (model weights, seed, settings, ``batch_size``).

    Returns:
        A :class:`TokenSet` (corpus ``generated``, split ``llm-qat``; every position after the first is
        scored) whose provenance records the generating model's fingerprint and the settings.
    """
    vocab = _check_generation(model, seq_len, n_sequences, greedy_tokens, temperature, vocab_size, batch_size, seed)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n_sequences,), generator=generator)  # (n,)
    tokens = torch.empty(n_sequences, seq_len, dtype=torch.long)
    tokens[:, 0] = starts
    n_batches = -(-n_sequences // batch_size)
    bar = tqdm(total=n_batches * (seq_len - 1), desc="generating", leave=False, disable=not progress)
    for first in range(0, n_sequences, batch_size):
        rows = slice(first, first + batch_size)
        cache = None
        for position in range(1, seq_len):
            step_input = tokens[rows, :position] if cache is None else tokens[rows, position - 1 : position]
            out = model(input_ids=step_input.to(device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].double().cpu()  # (b, vocab)
            if position <= greedy_tokens:
                tokens[rows, position] = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                tokens[rows, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            bar.update(1)
    bar.close()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    meta = {"generator": "full-precision model (LLM-QAT data-free)", "generator_fingerprint": weights_fingerprint(model),
            "greedy_tokens": greedy_tokens, "temperature": temperature, "start_vocab_size": vocab,
            "generation_batch_size": batch_size}
    return TokenSet(tokens, mask, "generated", "llm-qat", seq_len, seq_len,
                    tokenizer_id(tokenizer) if tokenizer is not None else "model-vocabulary", seed, meta)


def llm_qat(
    model: nn.Module,
    fmt: QuantFormat | str,
    seq_len: int,
    *,
    n_sequences: int = CALIBRATION_SEQUENCES,
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
    generation_seed: int = 0,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    generation_batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
    text: TokenSet | None = None,
    lr: float = DEFAULT_LR,
    epochs: float = DEFAULT_EPOCHS,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    seed: int = 0,
    distill_weight: float = 1.0,
    learned_scales: bool = False,
    layers: Sequence[str] | str | None = None,
    activations: ActivationQuant | int | None = None,
    kv: ActivationQuant | int | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> QuantResult:
    """Data-free QAT: generate ``n_sequences`` x ``seq_len`` tokens with the model, then distil into the grid.

    Args:
        seq_len, n_sequences, greedy_tokens, generation_seed, temperature, vocab_size, generation_batch_size:
            see :func:`generate_training_text` (the budget defaults to the 128 calibration sequences).
        text: previously generated text to reuse (e.g. across formats; generation is the slow part).
        distill_weight: 1 (default) is LLM-QAT's pure logit distillation; the other fine-tuning settings
            are those of :func:`landscape.quant.qaft.qaft`.

    Returns:
        A :class:`QuantResult` with method ``llm-qat``; ``calibration`` is the generated text's provenance.
    """
    record: dict[str, Any] = {"training_text": "generated by the full-precision model"}
    settings = FinetuneSettings(lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, weight_decay=weight_decay,
                                warmup_steps=warmup_steps, seed=seed, distill_weight=distill_weight,
                                learned_scales=learned_scales, quantize=True, activations=activations, kv=kv)
    resolve_layers(model, layers, parse_format(fmt))
    if text is None:
        _check_generation(model, seq_len, n_sequences, greedy_tokens, temperature, vocab_size, generation_batch_size,
                          generation_seed)
        settings.steps_for(n_sequences)
        t0 = time.perf_counter()
        text = generate_training_text(model, seq_len, n_sequences, greedy_tokens=greedy_tokens, seed=generation_seed,
                                      temperature=temperature, vocab_size=vocab_size,
                                      batch_size=generation_batch_size, progress=progress)
        record["generation_seconds"] = time.perf_counter() - t0
    elif not isinstance(text, TokenSet):
        raise QAFTError(f"text must be a TokenSet from generate_training_text, got {type(text).__name__}")
    return finetune(model, text, fmt, settings, layers=layers, method="llm-qat", model_name=model_name,
                    progress=progress, record=record)
