"""The pieces of one fine-tuning step of :func:`landscape.quant.qaft.qaft`, each a closed-form function.

* **Data order**: seeded permutations of the training sequences, one per epoch, cut into batches.
* **Schedule**: linear warm-up to the peak learning rate, then cosine decay towards 0.
* **Quantizers**: the straight-through fake quantization of a grid of w0 is :meth:`Grid.fake_quant`; with
  learned scales (LSQ-style), :func:`lsq_fake_quant`, whose final lattice is :func:`learned_grid`.
* **Losses**: token-mean NLL and ``KL(teacher || student)`` in nats/token over the scored positions.
* **Memory**: :func:`weights_made_when_used` forms each layer's fake-quantized weight as the layer runs and
  again in the backward pass, instead of keeping every layer's from the start of the forward pass to the end
  of the backward pass.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from landscape.data import TokenSet
from landscape.quant.formats import Grid
from landscape.weights import weight_is_transposed, working_dtype


# ----------------------------------------------------------------------------- data order and schedule
def training_batches(n_sequences: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The sequence indices of every step: seeded permutations of ``range(n)``, one per epoch, concatenated
    and cut into consecutive batches of ``batch_size`` (a batch may straddle two epochs)."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = -(-needed // n_sequences)
    order = torch.cat([torch.randperm(n_sequences, generator=generator) for _ in range(epochs)])
    return order[:needed].view(steps, batch_size).tolist()


def micro_batches(rows: list[int], size: int | None) -> list[list[int]]:
    """A step's sequence indices cut into consecutive micro-batches of ``size`` (``None``: one batch)."""
    if size is None or size >= len(rows):
        return [rows]
    return [rows[i: i + size] for i in range(0, len(rows), size)]


def scored_tokens(data: TokenSet, rows: list[int]) -> float:
    """Scored (predicted) tokens of the sequences ``rows``: what :func:`token_losses` divides by."""
    return float(data.score_mask[rows][:, 1:].sum())


def learning_rate_at(step: int, peak_lr: float, steps: int, warmup_steps: int) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay towards 0 at ``steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ quantizers
def lsq_fake_quant(w: torch.Tensor, grid: Grid, log_scale: torch.Tensor) -> torch.Tensor:
    """Fake quantization with learned scales (LSQ-style): ``s = grid.scale * exp(log_scale)`` per group.

    Forward: ``s * (clamp(round(w / s + zero), qmin, qmax) - zero)``, equal to ``grid.round(w)`` when
    ``log_scale == 0``. Backward: straight through the rounding only (not the clamp), so ``w`` gets
    gradient 1 inside the code range and 0 where clipped, and ``s`` gets LSQ's ``q - zero - w / s``
    (inside) or ``qmin/qmax - zero`` (clipped), times the upstream gradient. Learning the logarithm keeps
    the scale positive and makes an Adam step a relative change of about ``lr``.
    """
    scale = (grid.scale.to(w) * torch.exp(log_scale)).repeat_interleave(grid.group_size, dim=1)  # (out, in)
    zero = grid.zero.to(w).repeat_interleave(grid.group_size, dim=1)
    x = w / scale + zero
    # straight-through round
    codes = torch.clamp(x + (torch.round(x) - x).detach(), grid.fmt.qmin, grid.fmt.qmax)
    return scale * (codes - zero)


def learned_grid(grid: Grid, log_scale: torch.Tensor) -> Grid:
    """The lattice after learning: the same zero points and codes, scales ``grid.scale * exp(log_scale)``."""
    scale = grid.scale * torch.exp(log_scale.detach().to(grid.scale))
    return Grid(grid.fmt, scale, grid.zero, grid.group_size)


# ---------------------------------------------------------------------------------------------- losses
def token_losses(logits: torch.Tensor, tokens: torch.Tensor, score_mask: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None,
                 n_scored: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean NLL and ``KL(teacher || student)`` (nats/token) over the scored positions of a batch.

    ``logits`` and ``teacher_logits`` are ``(b, t, vocab)``; position ``t`` predicts ``tokens[:, t + 1]``
    and counts iff ``score_mask[:, t + 1]``. The KL is 0 when no teacher is given. ``n_scored``: divide the
    sums by this count instead of the batch's own (a micro-batch of a larger batch, :func:`scored_tokens`).
    """
    # (b, t-1, vocab)
    logp = F.log_softmax(logits[:, :-1].to(working_dtype(logits.dtype)), dim=-1)
    mask = score_mask[:, 1:].to(logp.dtype)  # (b, t-1)
    n_scored = mask.sum() if n_scored is None else n_scored
    nll_per_token = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    nll_mean = (nll_per_token * mask).sum() / n_scored
    if teacher_logits is None:
        return nll_mean, torch.zeros((), dtype=logp.dtype, device=logp.device)
    teacher_logp = F.log_softmax(teacher_logits[:, :-1].to(logp.dtype), dim=-1)
    kl_per_token = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)
    return nll_mean, (kl_per_token * mask).sum() / n_scored


# ------------------------------------------------------------------------------------------------ memory
@contextlib.contextmanager
def weights_made_when_used(layers: Mapping[str, nn.Module],
                           make: Callable[[str], torch.Tensor]) -> Iterator[None]:
    """While inside, each named linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) computes its output with
    ``make(name)``, its ``(out, in)`` forward weight (a fake-quantized latent weight), formed when the layer
    runs instead of before the forward pass, and not kept for the backward pass: autograd keeps its view's
    shape and strides, and the backward pass gets ``make(name)`` again (bit for bit the same; ``make`` must
    be a deterministic function of weights the backward pass does not change).

    Made up front and kept by the graph, every layer's forward weight would stay in memory from the start of
    the forward pass to the end of the backward pass: one more copy of the trained layers beside the latent
    weights, their gradients and the optimiser's moments. Made when used, one layer's is alive at a time, for
    a second rounding of each layer in the backward pass (far less than its matrix products). The layers'
    own parameters are not read. Hooks on the layers (activation quantization) run as before.

    Raises:
        RuntimeError: on leaving, if a named layer was never called: its made weight never reached the output
            (a model that reads the layer's weight directly, or skips the layer).
    """
    replaced, called = {}, set()

    def made(name: str) -> torch.Tensor:
        called.add(name)
        return make(name)

    try:
        for name, layer in layers.items():
            replaced[name] = layer.__dict__.get("forward")
            layer.forward = functools.partial(_made_weight_forward, layer, name, made)
        yield
        missed = [name for name in layers if name not in called]
        if missed:
            raise RuntimeError(f"{len(missed)} trained layers were not called in the forward pass, so their "
                               f"fake-quantized weights never reached the output: {missed[:3]}; a model that "
                               f"reads a layer's weight outside the layer's forward call cannot be trained "
                               f"this way: choose layers that the forward pass calls")
    finally:
        for name, previous in replaced.items():
            del layers[name].forward
            if previous is not None:
                layers[name].forward = previous


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """While inside, no parameter of ``model`` requires a gradient (each one's flag is restored on leaving):
    a backward pass then reaches only the tensors trained outside the model (latent weights)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def recomputed_blocks(blocks: Iterable[nn.Module]) -> Iterator[None]:
    """While inside, each block keeps only its inputs for the backward pass and runs its forward again when
    the backward pass reaches it (activation checkpointing, non-reentrant ``torch.utils.checkpoint``): a
    forward pass holds one block's activations for the backward pass instead of every block's, for one more
    forward pass. The same numbers, bit for bit, on deterministic kernels. The backward pass must run inside
    too (the recomputation then sees the same hooks and made weights), and the forward pass must not write a
    key-value cache (``use_cache=False``)."""
    replaced = {}
    try:
        for block in blocks:
            replaced[block] = block.__dict__.get("forward")
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        yield
    finally:
        for block, previous in replaced.items():
            del block.forward
            if previous is not None:
                block.forward = previous


def _made_weight_forward(layer: nn.Module, name: str, make: Callable[[str], torch.Tensor],
                         x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with the weight ``make(name)`` (``(out, in)``), which the graph keeps as its name only."""
    weight = make(name)
    storage = weight.untyped_storage().data_ptr()

    def pack(saved: torch.Tensor):
        if saved.layout != torch.strided or saved.untyped_storage().data_ptr() != storage:
            return saved
        return saved.size(), saved.stride(), saved.storage_offset()  # the weight, or a view of it

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        with torch.no_grad():
            return make(name).detach().as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if weight_is_transposed(layer):  # Conv1D's own forward, on the (in, out) view of the made weight
            out = torch.addmm(layer.bias, x.view(-1, x.size(-1)), weight.T)
            return out.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, layer.bias)
