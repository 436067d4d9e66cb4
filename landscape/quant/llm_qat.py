"""Data-free LLM-QAT (Liu et al., 2023): the full-precision model writes its own training text, and the
quantized model is fine-tuned to match the full-precision model's next-token distributions on it.

    starts <- n tokens drawn uniformly from the vocabulary (seeded)
    text   <- continue every start with the full-precision model: the first `greedy_tokens` tokens by
              argmax, the rest sampled from softmax(logits / temperature)
    result <- QAFT on text with the loss KL(p_w0 || p_student)   (distill_weight = 1: logit distillation)

The sequence budget is the calibration budget of the other methods (128 sequences by default, of the same
length), so LLM-QAT, QAFT and GPTQ see the same number of tokens; only their origin differs. How the text is
generated is a :class:`GenerationSettings`; how it trains is a :class:`~landscape.quant.qaft.FinetuneSettings`
(default :data:`LLM_QAT_SETTINGS`: QAFT's with ``distill_weight=1``), and the training loop is
:func:`landscape.quant.qaft.qaft` (same grid, optimiser, schedule, data order). Set ``activations`` / ``kv``
in the settings for W4A8KV4-style training as in the LLM-QAT paper.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.data import CALIBRATION_SEQUENCES, TokenSet, tokenizer_id
from landscape.quant.capture import resolve_layers
from landscape.quant.formats import QuantFormat, parse_format
from landscape.quant.qaft import FinetuneSettings, QAFTError, qaft
from landscape.quant.result import QuantResult
from landscape.weights import Base, LayerSelection, as_base

DEFAULT_GREEDY_TOKENS = 3
DEFAULT_GENERATION_BATCH_SIZE = 16
LLM_QAT_SETTINGS = FinetuneSettings(distill_weight=1.0)  # LLM-QAT's pure logit distillation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationSettings:
    """How LLM-QAT's training text is generated, validated on construction (the model's limits at use).

    Attributes:
        seq_len: tokens per sequence (2 .. the model's context length).
        n_sequences: how many sequences (default: the calibration budget, 128).
        greedy_tokens: tokens ``1 .. greedy_tokens`` of each sequence are the argmax continuation
            (``0 .. seq_len - 1``); the rest are sampled.
        temperature: sampling temperature (> 0): tokens are drawn from ``softmax(logits / temperature)``.
        vocab_size: start tokens are drawn uniformly from ``0 .. vocab_size - 1`` (None: the model's whole
            vocabulary; at most that).
        seed: seeds the start tokens and the samples (one CPU generator).
        batch_size: sequences decoded together (the text depends on it through float rounding).
    """

    seq_len: int
    n_sequences: int = CALIBRATION_SEQUENCES
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS
    temperature: float = 1.0
    vocab_size: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE

    def __post_init__(self) -> None:
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise QAFTError(f"seq_len must be an integer in 2..context length, got {self.seq_len!r}")
        if not _is_int(self.seed):
            raise QAFTError(f"seed must be an integer, got {self.seed!r}")
        if not _is_int(self.n_sequences) or self.n_sequences < 1:
            raise QAFTError(f"n_sequences must be an integer >= 1, got {self.n_sequences!r}")
        if not _is_int(self.greedy_tokens) or not 0 <= self.greedy_tokens <= self.seq_len - 1:
            raise QAFTError(f"greedy_tokens must be an integer in 0..seq_len-1={self.seq_len - 1}, "
                            f"got {self.greedy_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise QAFTError(f"temperature must be a finite number > 0, got {t!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise QAFTError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.vocab_size is not None and (not _is_int(self.vocab_size) or self.vocab_size < 1):
            raise QAFTError(f"vocab_size must be an integer >= 1 (or None: the model's vocabulary), "
                            f"got {self.vocab_size!r}")

    def start_vocabulary(self, model: nn.Module) -> int:
        """Check the settings against ``model`` (context length, vocabulary); returns the vocabulary size to
        draw start tokens from."""
        cfg = getattr(model, "config", None)
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if context and self.seq_len > context:
            raise QAFTError(f"seq_len must be an integer in 2..{context}, got {self.seq_len!r}")
        model_vocab = model.get_input_embeddings().num_embeddings
        vocab = model_vocab if self.vocab_size is None else self.vocab_size
        if vocab > model_vocab:
            raise QAFTError(f"vocab_size must be an integer in 1..{model_vocab} (the model's vocabulary), "
                            f"got {self.vocab_size!r}")
        return vocab


@torch.no_grad()
def generate_training_text(
    model: nn.Module | Base,
    generation: GenerationSettings,
    *,
    tokenizer: Any = None,
    progress: bool = True,
) -> TokenSet:
    """LLM-QAT's self-generated training text: ``n_sequences`` sequences of ``seq_len`` tokens from the model.

    Token 0 of each sequence is drawn uniformly from ``0 .. vocab_size - 1`` (default: the model's whole
    vocabulary); tokens ``1 .. greedy_tokens`` are the argmax continuation, the rest are sampled from
    ``softmax(logits / temperature)`` (see :class:`GenerationSettings`). Decoding uses the model's key-value
    cache. Start tokens and samples come from one CPU generator seeded with ``generation.seed``
    (probabilities in float64 on the CPU), so the text is a deterministic function of (model weights,
    settings), ``batch_size`` included.

    Args:
        model: the full-precision model, or its :class:`~landscape.weights.Base`.
        tokenizer: recorded as the text's tokenizer (default: ``model-vocabulary``).

    Returns:
        A :class:`TokenSet` (corpus ``generated``, split ``llm-qat``; every position after the first is
        scored) whose provenance records the generating model's fingerprint and the settings.
    """
    base = as_base(model)
    model = base.model
    g = generation
    vocab = g.start_vocabulary(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(g.seed)
    starts = torch.randint(0, vocab, (g.n_sequences,), generator=generator)  # (n,)
    tokens = torch.empty(g.n_sequences, g.seq_len, dtype=torch.long)
    tokens[:, 0] = starts
    n_batches = -(-g.n_sequences // g.batch_size)
    bar = tqdm(total=n_batches * (g.seq_len - 1), desc="generating", leave=False, disable=not progress)
    for first in range(0, g.n_sequences, g.batch_size):
        rows = slice(first, first + g.batch_size)
        cache = None
        for position in range(1, g.seq_len):
            step_input = tokens[rows, :position] if cache is None else tokens[rows, position - 1 : position]
            out = model(input_ids=step_input.to(device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].double().cpu()  # (b, vocab)
            if position <= g.greedy_tokens:
                tokens[rows, position] = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / g.temperature, dim=-1)
                tokens[rows, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            bar.update(1)
    bar.close()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    meta = {"generator": "full-precision model (LLM-QAT data-free)",
            "generator_fingerprint": base.fingerprint(), "greedy_tokens": g.greedy_tokens,
            "temperature": g.temperature, "start_vocab_size": vocab, "generation_batch_size": g.batch_size}
    return TokenSet(tokens, mask, "generated", "llm-qat", g.seq_len, g.seq_len,
                    tokenizer_id(tokenizer) if tokenizer is not None else "model-vocabulary", g.seed, meta)


def llm_qat(
    model: nn.Module | Base,
    fmt: QuantFormat | str,
    settings: FinetuneSettings = LLM_QAT_SETTINGS,
    generation: GenerationSettings | None = None,
    *,
    text: TokenSet | None = None,
    layers: LayerSelection = None,
    progress: bool = True,
) -> QuantResult:
    """Data-free QAT: generate ``n_sequences`` x ``seq_len`` tokens with the model, then distil into the grid.

    Args:
        model: the model at w0 (left bit-exactly unchanged), or its :class:`~landscape.weights.Base`.
        fmt: the weight format.
        settings: the fine-tuning settings (:class:`~landscape.quant.qaft.FinetuneSettings`; default
            :data:`LLM_QAT_SETTINGS`, LLM-QAT's pure logit distillation ``distill_weight=1``). A learning-rate
            sweep is refused: it is chosen on calibration data, and LLM-QAT trains on generated text.
        generation: how to generate the text (:class:`GenerationSettings`; the budget defaults to the 128
            calibration sequences). Required unless ``text`` is given.
        text: previously generated text to reuse (e.g. across formats; generation is the slow part).
        layers: layer names or glob patterns to train (default: every quantizable decoder linear).

    Returns:
        A :class:`QuantResult` with method ``llm-qat``; ``calibration`` is the generated text's provenance.
    """
    base = as_base(model)
    if not isinstance(settings, FinetuneSettings):
        raise QAFTError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    if settings.lr_sweep is not None:
        raise QAFTError("a learning-rate sweep is not available for llm-qat (its text is generated, there is "
                        "no calibration split to select on); give a number")
    if not settings.quantize:
        raise QAFTError("llm-qat quantizes: settings.quantize must be True")
    record: dict[str, Any] = {"training_text": "generated by the full-precision model"}
    resolve_layers(base.model, layers, parse_format(fmt))
    if text is None:
        if not isinstance(generation, GenerationSettings):
            raise QAFTError(f"generation must be a GenerationSettings (or text given), got {generation!r}")
        generation.start_vocabulary(base.model)
        settings.steps_for(generation.n_sequences)
        t0 = time.perf_counter()
        text = generate_training_text(base, generation, progress=progress)
        record["generation_seconds"] = time.perf_counter() - t0
    elif not isinstance(text, TokenSet):
        raise QAFTError(f"text must be a TokenSet from generate_training_text, got {type(text).__name__}")
    result = qaft(base, text, fmt, settings, layers=layers, progress=progress)
    return replace(result, method="llm-qat", extra={**result.extra, **record})
