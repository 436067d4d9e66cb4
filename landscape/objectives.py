"""The two objectives of the study: the global NLL of the whole model and each layer's local output MSE.

* :func:`nll` is the token-mean negative log-likelihood (nats per scored token) over a
  :class:`~landscape.data.TokenSet`; it always comes back with its :class:`NLLConvention` (model,
  data hash, sequence length, stride, segment and token counts), because NLL numbers from different
  conventions are not comparable.
* :func:`layer_mse` is GPTQ's local objective, ``MSE(W x, W' x)``, for each named linear layer on the
  inputs ``x`` that layer sees, computed from hooks as ``mean((x dW^T)^2)`` with ``dW = W' - W``: no
  second copy of the model is ever made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.weights import get_layer, model_label, swapped_weights, weight_matrix, working_dtype


@dataclass(frozen=True)
class NLLConvention:
    """How an NLL was computed. Two NLLs are comparable only if their conventions match (model aside)."""

    model: str
    corpus: str
    split: str
    data_hash: str
    seq_len: int
    stride: int
    n_segments: int
    n_tokens: int
    reduction: str = "token-mean"
    unit: str = "nats/token"

    @classmethod
    def for_data(cls, data: TokenSet, model_name: str) -> "NLLConvention":
        """The convention of an NLL of ``model_name`` over ``data`` (what :func:`nll` reports)."""
        return cls(model_name, data.corpus, data.split, data.content_hash, data.seq_len, data.stride,
                   data.n_segments, data.n_scored_tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.corpus}/{self.split}, {self.n_segments} x {self.seq_len} tokens, "
                f"stride {self.stride}, {self.n_tokens:,} scored tokens, {self.reduction} {self.unit}, "
                f"data {self.data_hash}")

    def same_data(self, other: "NLLConvention") -> bool:
        a, b = self.to_dict(), other.to_dict()
        a.pop("model"), b.pop("model")
        return a == b


@dataclass(frozen=True)
class NLLResult:
    """A token-mean NLL with its per-segment parts (for bootstrap intervals) and its convention."""

    value: float
    segment_nll_sum: np.ndarray
    segment_tokens: np.ndarray
    convention: NLLConvention

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.value))

    @property
    def segment_nll(self) -> np.ndarray:
        """Token-mean NLL of each segment."""
        return self.segment_nll_sum / self.segment_tokens

    def __str__(self) -> str:
        return f"NLL {self.value:.4f} nats/token (ppl {self.perplexity:.2f}; {self.convention.describe()})"


def segment_nll_sums(model: nn.Module, tokens: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the scored tokens of each segment: ``(batch,)``, in the logits' dtype (float64 stays
    float64).

    Cross-entropy is computed from ``.logits`` directly (HF's loss casts to float32).
    """
    device = next(model.parameters()).device
    tokens, score_mask = tokens.to(device), score_mask.to(device)
    return nll_sums_from_logits(model(input_ids=tokens).logits, tokens, score_mask)


# Without gradients, the log-softmax is taken over at most this many logits at a time (64 MB in float32).
LOG_SOFTMAX_CHUNK = 1 << 24


def nll_sums_from_logits(logits: torch.Tensor, tokens: torch.Tensor,
                         score_mask: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the scored tokens of each segment from ``(b, t, vocab)`` logits: ``(b,)``.

    bfloat16 / float16 logits are normalised and summed in float32 (a bf16 log-softmax over a 49k
    vocabulary and a bf16 sum over 2k tokens would each cost more than the effects we measure).

    Without gradients (evaluations) the log-probabilities are formed a block of positions at a time
    (:data:`LOG_SOFTMAX_CHUNK` logits), not as a second logits-sized tensor: 0.4 GB for SmolLM2's 49k
    vocabulary over 4 x 512 tokens. Each position's log-softmax is its own row, so the sums are the same
    bits; with gradients the whole tensor is formed, so the graph (and a Hessian's double backward) is the
    one it always was.
    """
    work = working_dtype(logits.dtype)
    b, t, vocab = logits.shape
    n = t - 1  # position p predicts tokens[:, p + 1]
    whole = logits.requires_grad and torch.is_grad_enabled()
    step = max(1, n if whole else LOG_SOFTMAX_CHUNK // max(1, b * vocab))
    pieces = []
    for start in range(0, max(n, 1), step):  # one empty block for a one-token segment
        stop = min(start + step, n)
        logp = F.log_softmax(logits[:, start:stop].to(work), dim=-1)
        pieces.append(-logp.gather(-1, tokens[:, start + 1 : stop + 1, None]).squeeze(-1))
        del logp
    nll_tok = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # (b, t-1)
    return (nll_tok * score_mask[:, 1:]).sum(dim=1)


def check_in_vocabulary(model: nn.Module, data: TokenSet, what: str = "data") -> None:
    """Raise ``ValueError`` unless every token id of ``data`` is inside ``model``'s vocabulary.

    A :class:`~landscape.data.TokenSet` already holds non-empty, non-negative integer ids
    (:func:`landscape.data.check_token_ids`); this is the model-dependent half. Cheap (a min and a max),
    called before any forward pass so that text tokenized for another model fails at once with the offending
    range, not deep inside an embedding lookup mid-run.
    """
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(data.tokens.min()), int(data.tokens.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{what} ({data.name}): token ids must lie in 0..{vocab - 1} "
                         f"(the model's vocabulary), got {lo}..{hi}: "
                         f"was it tokenized for another model?")


@torch.no_grad()
def nll(model: nn.Module, data: TokenSet, batch_size: int = 8, model_name: str | None = None,
        progress: bool = False) -> NLLResult:
    """Token-mean NLL (nats per scored token) of ``model`` on ``data``.

    Args:
        batch_size: segments per forward pass (memory only; the value does not depend on it beyond
            floating-point summation order).
        model_name: recorded in the convention (default: the model's ``name_or_path``).
    """
    check_in_vocabulary(model, data)
    sums, counts = [], []
    batches = data.batches(batch_size)
    if progress:
        batches = tqdm(batches, total=-(-data.n_segments // batch_size), desc="NLL", leave=False)
    for tokens, mask in batches:
        sums.append(segment_nll_sums(model, tokens, mask).double().cpu())
        counts.append(mask[:, 1:].sum(dim=1))
    s = torch.cat(sums).numpy()
    c = torch.cat(counts).numpy().astype(np.int64)
    conv = NLLConvention.for_data(data, model_label(model, model_name))
    return NLLResult(float(s.sum() / c.sum()), s, c, conv)


# ------------------------------------------------------------------------------------------ layer MSE
InputSource = Literal["reference", "modified"]


@torch.no_grad()
def layer_mse(
    model: nn.Module,
    data: TokenSet,
    weights: Mapping[str, torch.Tensor],
    inputs: InputSource = "reference",
    batch_size: int = 8,
) -> dict[str, float]:
    """Each named layer's local output MSE, ``mean over tokens and outputs of (W x - W' x)^2``.

    Args:
        model: the reference model (its current weights are W; they are left bit-exactly as found).
        weights: layer name -> modified ``(out, in)`` weight W' (e.g. a quantized model's weights).
        inputs: which inputs ``x`` each layer sees. ``"reference"``: those of the unmodified model
            (every layer judged on the same inputs, as in the paper's layer-wise objective);
            ``"modified"``: those of the model with *all* weights replaced, i.e. what the layer meets
            when earlier layers are modified too (sequential GPTQ's view).

    Returns:
        layer name -> MSE (units: squared activations), averaged over every token position of ``data``.
    """
    if inputs not in ("reference", "modified"):
        raise ValueError(f"inputs must be 'reference' or 'modified', got {inputs!r}")
    check_in_vocabulary(model, data)
    deltas: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        w0 = weight_matrix(get_layer(model, name))
        if tuple(w.shape) != tuple(w0.shape):
            raise ValueError(f"weight for {name!r} has shape {tuple(w.shape)}, "
                             f"layer expects {tuple(w0.shape)}")
        # the model's own rounding of W' (its dtype), the difference formed in float32 for bf16 / fp16
        work = working_dtype(w0.dtype)
        deltas[name] = w.to(w0).to(work) - w0.detach().to(work)
    sq_sum = {n: 0.0 for n in deltas}
    count = {n: 0 for n in deltas}

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            delta = deltas[name]
            err = x.to(delta.dtype) @ delta.T  # (b, t, out): W' x - W x for each token
            sq_sum[name] += float(err.double().pow(2).sum())
            count[name] += err.numel()

        return hook

    handles = [get_layer(model, n).register_forward_hook(hook_for(n)) for n in deltas]
    try:
        def run():
            for tokens, _ in data.batches(batch_size):
                model(input_ids=tokens.to(next(model.parameters()).device))

        if inputs == "modified":
            with swapped_weights(model, weights):
                run()
        else:
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: sq_sum[n] / count[n] for n in deltas}
