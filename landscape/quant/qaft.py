"""Quantization-aware fine-tuning (QAFT), its full-precision control, and learning-rate selection.

QAFT minimises the *global* NLL of the whole model through fake quantization with a straight-through
estimator (STE), on the same calibration sequences GPTQ sees. Latent weights ``W`` start at w0 (so the
first forward pass is the RTN model) or at a given start result (e.g. GPTQ):

    grid   <- make_grid(w0, fmt)                    # static, shared with RTN and GPTQ
    for step t = 0 .. T-1:
        batch <- next B sequences of a seeded permutation of the calibration set (one per epoch)
        W_q   <- grid.fake_quant(W)                  # forward: nearest grid point; backward: identity
        loss  <- (1 - a) NLL(W_q; batch) + a KL(p_w0 || p_W_q; batch)
        W     <- AdamW(W, grad, lr_t)                # lr_t: linear warm-up, then cosine to 0
    return grid.round(W)                             # exactly on the lattice of RTN and GPTQ

The **full-precision control** (``fp-finetune``) is this very loop with the quantizer switched off
(``W_q = W``): same optimiser, schedule, steps, seed, data order and trained parameters, so the part of
QAFT's gain that is plain adaptation to the calibration text can be measured. With ``lr = 0`` it
returns w0 bit-exactly.

Conventions:

* Only the quantized layers' weights train (in the ``(out, in)`` orientation of
  :func:`landscape.models.weight_matrix`); every other parameter is frozen. The model itself is never
  written to: the trained weights are substituted with :func:`torch.func.functional_call`, so the model
  holds w0 bit-exactly during, after, and on an exception out of the loop.
* The model stays in eval mode (no dropout): a step is a deterministic function of (weights, batch).
* ``NLL`` is the token mean over the calibration set's scored positions (nats/token); ``KL`` is
  ``KL(teacher || student)`` per scored position, token mean (nats/token), the teacher being the model
  at w0 with full-precision activations.
* Same inputs and seed give bit-identical weights on the same machine and thread count.

**Default learning rate: ``DEFAULT_LR = 3e-4``**, one pass over the 128 sequences in batches of 4 (32
steps), no warm-up, no weight decay. Adam moves every latent weight by about ``lr`` per step whatever
the gradient's size, so what matters is ``lr * steps`` against the distance of each weight to its nearest
rounding boundary (up to half a grid step, range / 2^bits): too small and no weight leaves its RTN point,
too large and many flip together. Measured on SmolLM2-135M (128 x 256 calibration tokens, all 210 linears,
per-channel): at 3e-4, 0.71 % of the weights leave their RTN point at int3 and 1.42 % at int4, the
training NLL falls from 6.23 to 3.69 (int3) and from 3.39 to 2.80 (int4), and the displacement norm stays
within 0.1 % of RTN's. FIELD_NOTES' pilots put the useful range at 1e-4 .. 1e-3 (1e-5 barely moves).

3e-4 is the geometric middle of that range, and what :func:`select_learning_rate` picks on SmolLM2 at int4
(112 calibration sequences train, 16 validate; validation NLL 2.910 / 2.855 / 3.010 at 1e-4 / 3e-4 / 1e-3).
At int3 it picks 1e-3 (3.823 vs 3.846 at 3e-4), and for the full-precision control 1e-4 (2.575 vs 2.580 at
3e-4; at 1e-3 the control overshoots). The best rate depends on the format and the method: select it per run
on the calibration budget only, never on held-out text, and pass the sweep as ``lr`` (it is then stored with
the result; ``analyses/lr_sweep.py`` runs the sweeps).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.objectives import layer_mse, nll
from landscape.quant.activations import ActivationQuant, as_activation_quant, quantized_activations
from landscape.quant.capture import check_calibration, resolve_layers
from landscape.quant.formats import Grid, QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult
from landscape.weights import get_layer, parameter_layout, swapped_weights, weight_matrix, weights_fingerprint

DEFAULT_LR = 3e-4
DEFAULT_EPOCHS = 1.0
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR_CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_VALIDATION_SEQUENCES = 16
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8


class QAFTError(ValueError):
    """Invalid fine-tuning settings, or a start point that does not belong to this model and format."""


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of one QAFT / fp-finetune / LLM-QAT run, validated on construction.

    Attributes:
        lr: peak AdamW learning rate (>= 0; units of weight per step for Adam's normalised update).
        epochs: passes over the training sequences (used when ``steps`` is None; > 0).
        steps: optimiser steps (>= 1); overrides ``epochs``.
        batch_size: sequences per step.
        weight_decay: decoupled AdamW weight decay of the latent weights (towards 0, not towards w0).
        warmup_steps: linear warm-up steps before the cosine decay (0 .. steps - 1).
        seed: seeds the data order (one permutation of the sequences per epoch).
        distill_weight: ``a`` in ``(1 - a) NLL + a KL``; 0 = plain NLL, 1 = pure logit distillation.
        learned_scales: also learn one multiplicative scale per grid group (LSQ-style, see :func:`lsq_fake_quant`).
        quantize: False switches the quantizer off (the full-precision control).
        activations, kv: activation / key-value fake quantization during training (student only).
    """

    lr: float = DEFAULT_LR
    epochs: float = DEFAULT_EPOCHS
    steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    distill_weight: float = 0.0
    learned_scales: bool = False
    quantize: bool = True
    activations: ActivationQuant | int | None = None
    kv: ActivationQuant | int | None = None

    def __post_init__(self) -> None:
        def is_number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_number(self.lr) or self.lr < 0:
            raise QAFTError(f"lr must be a finite number >= 0 (e.g. {DEFAULT_LR}), got {self.lr!r}")
        if not is_number(self.epochs) or self.epochs <= 0:
            raise QAFTError(f"epochs must be a finite number > 0, got {self.epochs!r}")
        if self.steps is not None and (not is_int(self.steps) or self.steps < 1):
            raise QAFTError(f"steps must be an integer >= 1 (or None to use epochs), got {self.steps!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise QAFTError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise QAFTError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise QAFTError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not is_int(self.seed):
            raise QAFTError(f"seed must be an integer, got {self.seed!r}")
        if not is_number(self.distill_weight) or not 0 <= self.distill_weight <= 1:
            raise QAFTError(f"distill_weight must be in [0, 1] (0: NLL only, 1: KL only), got {self.distill_weight!r}")
        for name in ("activations", "kv"):  # an int b means per-token asymmetric b-bit quantization
            object.__setattr__(self, name, as_activation_quant(getattr(self, name)))
        if not self.quantize and (self.learned_scales or self.activations or self.kv):
            raise QAFTError("the full-precision control (quantize=False) switches every quantizer off: "
                            "learned_scales must be False and activations/kv None")

    def steps_for(self, n_sequences: int) -> int:
        """Optimiser steps on ``n_sequences`` training sequences: ``steps``, or ``round(epochs * n / batch_size)``."""
        if self.batch_size > n_sequences:
            raise QAFTError(f"batch_size={self.batch_size} exceeds the {n_sequences} training sequences")
        steps = self.steps if self.steps is not None else max(1, round(self.epochs * n_sequences / self.batch_size))
        if self.warmup_steps >= steps:
            raise QAFTError(f"warmup_steps={self.warmup_steps} must be smaller than the number of steps ({steps})")
        return steps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activations"] = self.activations.name if self.activations else None
        d["kv"] = self.kv.name if self.kv else None
        return d


def training_batches(n_sequences: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The sequence indices of every step: seeded permutations of ``range(n)``, one per epoch, concatenated
    and cut into consecutive batches of ``batch_size`` (a batch may straddle two epochs)."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order = torch.cat([torch.randperm(n_sequences, generator=generator) for _ in range(-(-needed // n_sequences))])
    return order[:needed].view(steps, batch_size).tolist()


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
    codes = torch.clamp(x + (torch.round(x) - x).detach(), grid.fmt.qmin, grid.fmt.qmax)  # straight-through round
    return scale * (codes - zero)


def learned_grid(grid: Grid, log_scale: torch.Tensor) -> Grid:
    """The lattice after learning: the same zero points and codes, scales ``grid.scale * exp(log_scale)``."""
    return Grid(grid.fmt, grid.scale * torch.exp(log_scale.detach().to(grid.scale)), grid.zero, grid.group_size)


# ---------------------------------------------------------------------------------------------- losses
def token_losses(logits: torch.Tensor, tokens: torch.Tensor, score_mask: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean NLL and ``KL(teacher || student)`` (nats/token) over the scored positions of a batch.

    ``logits`` and ``teacher_logits`` are ``(b, t, vocab)``; position ``t`` predicts ``tokens[:, t + 1]``
    and counts iff ``score_mask[:, t + 1]``. The KL is 0 when no teacher is given.
    """
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    logp = F.log_softmax(logits[:, :-1].float() if low_precision else logits[:, :-1], dim=-1)  # (b, t-1, vocab)
    mask = score_mask[:, 1:].to(logp.dtype)  # (b, t-1)
    n_scored = mask.sum()
    nll_per_token = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    nll_mean = (nll_per_token * mask).sum() / n_scored
    if teacher_logits is None:
        return nll_mean, torch.zeros((), dtype=logp.dtype, device=logp.device)
    teacher_logp = F.log_softmax(teacher_logits[:, :-1].to(logp.dtype), dim=-1)
    kl_per_token = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)
    return nll_mean, (kl_per_token * mask).sum() / n_scored


# --------------------------------------------------------------------------------------- learning rates
@dataclass(frozen=True)
class LearningRateSweep:
    """Learning-rate selection on the calibration budget only (see :func:`select_learning_rate`).

    Attributes:
        candidates: learning rates tried, ascending.
        validation_nll: token-mean NLL (nats/token) on the held-back calibration sequences after training
            with each candidate (snapped onto the grid for QAFT).
        start_validation_nll: the same NLL at the starting point (RTN, the start result, or w0).
        best_lr: the candidate with the lowest validation NLL (the smallest such rate on a tie).
        train_sequences, validation_sequences: indices into the calibration set of the two parts.
        calibration_hash: content hash of the calibration set the split was made from.
        format: weight format name (None for the full-precision control), method: ``qaft`` or ``fp-finetune``.
        settings: the fine-tuning settings of every candidate run (lr aside); seconds: wall time.
    """

    candidates: tuple[float, ...]
    validation_nll: tuple[float, ...]
    start_validation_nll: float
    best_lr: float
    train_sequences: tuple[int, ...]
    validation_sequences: tuple[int, ...]
    calibration_hash: str
    format: str | None
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The sweep as a Markdown table (validation NLL per learning rate, the choice marked)."""
        rows = ["| lr | validation NLL | vs start |", "|---|---|---|",
                f"| start | {self.start_validation_nll:.4f} | 0 |"]
        for lr, value in zip(self.candidates, self.validation_nll):
            mark = " **chosen**" if lr == self.best_lr else ""
            rows.append(f"| {lr:g}{mark} | {value:.4f} | {value - self.start_validation_nll:+.4f} |")
        return "\n".join(rows)


def select_learning_rate(
    model: nn.Module,
    calib: TokenSet,
    fmt: QuantFormat | str | None,
    *,
    candidates: Sequence[float] = DEFAULT_LR_CANDIDATES,
    n_validation: int = DEFAULT_VALIDATION_SEQUENCES,
    split_seed: int = 0,
    eval_batch_size: int = 8,
    progress: bool = True,
    **settings: Any,
) -> LearningRateSweep:
    """Pick the QAFT (or fp-finetune) learning rate on the calibration budget alone.

    The calibration sequences are split (seeded by ``split_seed``) into ``n - n_validation`` training and
    ``n_validation`` validation sequences (128 -> 112 + 16 by default). For each candidate, :func:`qaft`
    trains on the training part with ``settings`` (same epochs/steps, batch size, seed, start...), and
    the token-mean NLL of the result on the validation part is measured. Held-out text is never used.

    Returns:
        A :class:`LearningRateSweep`; pass it to :func:`qaft` as ``lr`` to train on all ``n`` sequences
        with the chosen rate and store the sweep in ``result.extra["lr_selection"]``.
    """
    check_calibration(model, calib)
    rates = sorted(float(c) for c in candidates)
    if not rates or any(not math.isfinite(c) or c < 0 for c in rates):
        raise QAFTError(f"candidates must be a non-empty list of finite learning rates >= 0, got {list(candidates)!r}")
    if isinstance(n_validation, bool) or not isinstance(n_validation, int) or not 1 <= n_validation < calib.n_segments:
        raise QAFTError(f"n_validation must be an integer in 1..{calib.n_segments - 1} "
                        f"(the calibration set has {calib.n_segments} sequences), got {n_validation!r}")
    accepted = [p for p in inspect.signature(qaft).parameters if p not in ("model", "calib", "fmt", "lr", "progress")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise QAFTError(f"unknown settings {unknown} for select_learning_rate (learning rates go in candidates=); "
                        f"accepted: {accepted}")
    permutation = torch.randperm(calib.n_segments, generator=torch.Generator().manual_seed(split_seed))
    validation_idx = sorted(permutation[:n_validation].tolist())
    train_idx = sorted(permutation[n_validation:].tolist())
    train_set, validation_set = calib.subset(train_idx), calib.subset(validation_idx)
    # Check every setting, the layers, the format and the start point before anything trains.
    plan = _plan(model, train_set, fmt, settings.get("layers"), settings.get("start"),
                 FinetuneSettings(lr=rates[0], **{k: v for k, v in settings.items()
                                                  if k not in ("layers", "start", "model_name", "mse_data")}))
    # Each candidate's layer MSE is not used by the selection: measure it on one sequence, not on all of them.
    settings.setdefault("mse_data", train_set.subset([0]))

    t0 = time.perf_counter()
    with torch.no_grad():
        start_weights = {n: plan.start_model(n) for n in plan.names}
    with swapped_weights(model, start_weights):
        start_nll = nll(model, validation_set, batch_size=eval_batch_size).value
    values = []
    for lr in tqdm(rates, desc="lr sweep", leave=False, disable=not progress):
        result = qaft(model, train_set, fmt, lr=lr, **{**settings, "progress": False})
        with swapped_weights(model, result.weights):
            values.append(nll(model, validation_set, batch_size=eval_batch_size).value)
    best = rates[min(range(len(rates)), key=lambda i: (values[i], i))]
    recorded = {k: (v.label if isinstance(v, QuantResult) else v) for k, v in settings.items() if k != "mse_data"}
    return LearningRateSweep(
        candidates=tuple(rates), validation_nll=tuple(values), start_validation_nll=start_nll, best_lr=best,
        train_sequences=tuple(train_idx), validation_sequences=tuple(validation_idx),
        calibration_hash=calib.content_hash, format=plan.fmt.name if plan.fmt else None,
        method=plan.method, settings=_jsonable_settings(recorded), seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class _Plan:
    """Everything a run needs, checked before any training: layers, grids, start point, settings."""

    names: list[str]
    w0: dict[str, torch.Tensor]
    grids: dict[str, Grid]
    start: QuantResult | None
    fmt: QuantFormat | None
    settings: FinetuneSettings
    steps: int

    @property
    def method(self) -> str:
        return "qaft" if self.settings.quantize else "fp-finetune"

    def start_point(self, name: str) -> torch.Tensor:
        """Initial latent weights: the start result's, else w0 (QAFT and the control alike).

        For QAFT, latent w0 makes the first forward pass the RTN model (``grid.round(w0)``) while every
        weight keeps its distance to the nearest rounding boundary; latent weights placed *on* the RTN
        lattice points would have to travel half a grid step before any of them changes, which a
        small learning rate never does (QAFT would silently return RTN).
        """
        if self.start is not None:
            return self.start.weights[name].to(self.w0[name])
        return self.w0[name]

    def start_model(self, name: str) -> torch.Tensor:
        """The weights of the model before training: the start result, RTN (``grid.round(w0)``) or w0 (control)."""
        latent = self.start_point(name)
        return self.grids[name].round(latent) if self.settings.quantize else latent


def _plan(model: nn.Module, data: TokenSet, fmt: QuantFormat | str | None, layers: Sequence[str] | str | None,
          start: QuantResult | None, settings: FinetuneSettings) -> _Plan:
    check_calibration(model, data)
    fmt = parse_format(fmt) if fmt is not None else None
    if settings.quantize and fmt is None:
        raise QAFTError("QAFT needs a weight format (e.g. 'int4'); fmt=None is only for fp-finetune")
    steps = settings.steps_for(data.n_segments)
    names = resolve_layers(model, layers, fmt)
    w0 = {n: weight_matrix(get_layer(model, n)).detach().clone() for n in names}  # (out, in)
    grids = {n: make_grid(w0[n], fmt, n) for n in names} if fmt is not None else {}
    if start is not None:
        _check_start(model, start, fmt, names, grids, settings)
    return _Plan(names, w0, grids, start, fmt, settings, steps)


def _check_start(model: nn.Module, start: QuantResult, fmt: QuantFormat | None, names: list[str],
                 grids: dict[str, Grid], settings: FinetuneSettings) -> None:
    if not isinstance(start, QuantResult):
        raise QAFTError(f"start must be a QuantResult (e.g. from rtn or gptq), got {type(start).__name__}")
    if not settings.quantize:
        raise QAFTError("fp-finetune starts at w0 (it is the full-precision control); start= is for QAFT only")
    if start.format is None or start.format.name != fmt.name:
        raise QAFTError(f"start is a {start.label!r} result in format "
                        f"{start.format.name if start.format else None!r}; QAFT was asked for {fmt.name!r}")
    missing = [n for n in names if n not in start.weights]
    if missing:
        raise QAFTError(f"start ({start.label}) has no weights for {len(missing)} of the layers to train, "
                        f"e.g. {missing[:3]}; pass layers= matching its {len(start.weights)} layers")
    fingerprint = weights_fingerprint(model, list(start.weights))
    if start.base_fingerprint != fingerprint:
        raise QAFTError(f"start ({start.label}) was computed on base {start.base_model!r} with fingerprint "
                        f"{start.base_fingerprint!r}, but this model's weights have fingerprint {fingerprint!r}")
    for n in names:
        w = start.weights[n]
        if tuple(w.shape) != tuple(grids[n].shape):
            raise QAFTError(f"start ({start.label}) weight of {n!r} has shape {tuple(w.shape)}, "
                            f"the layer has {tuple(grids[n].shape)}")
        if not grids[n].contains(w.to(grids[n].scale)):
            raise QAFTError(f"start ({start.label}) weight of {n!r} is not on the {fmt.name} grid of w0 "
                            f"(e.g. a LoRC-corrected result); QAFT starts from lattice points")


def finetune(
    model: nn.Module,
    data: TokenSet,
    fmt: QuantFormat | str | None,
    settings: FinetuneSettings,
    *,
    layers: Sequence[str] | str | None = None,
    start: QuantResult | None = None,
    method: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
    record: dict[str, Any] | None = None,
    mse_data: TokenSet | None = None,
) -> QuantResult:
    """The one training loop behind :func:`qaft`, :func:`fp_finetune` and LLM-QAT (module docstring).

    Args:
        model: the model at w0; never modified (weights substituted with ``functional_call``).
        data: the training sequences (the calibration set, or LLM-QAT's generated text).
        fmt: the weight format; for the control (``settings.quantize=False``) only recorded as the paired format.
        settings: validated hyper-parameters.
        layers: layer names or glob patterns to train (default: every quantizable decoder linear).
        start: a QuantResult on the same grid to start the latent weights from (QAFT only).
        method: recorded method name (default ``qaft`` / ``fp-finetune``).
        record: extra entries for ``result.extra`` (e.g. the learning-rate sweep, generation settings).
        mse_data: inputs of the result's ``layer_mse`` (default ``data``; a subset of it costs less).

    Returns:
        A :class:`QuantResult` (weights in the model's dtype and device; see :func:`qaft` for ``extra``).
    """
    plan = _plan(model, data, fmt, layers, start, settings)
    device = next(iter(plan.w0.values())).device
    modules = {n: get_layer(model, n) for n in plan.names}
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    latent = {n: plan.start_point(n).clone().requires_grad_(True) for n in plan.names}  # (out, in)
    log_scales = ({n: torch.zeros_like(plan.grids[n].scale, requires_grad=True) for n in plan.names}
                  if settings.learned_scales else {})
    optimizer = torch.optim.AdamW(
        [{"params": list(latent.values()), "weight_decay": settings.weight_decay},
         {"params": list(log_scales.values()), "weight_decay": 0.0}],
        lr=settings.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)

    def forward_weight(name: str) -> torch.Tensor:
        if not settings.quantize:
            return latent[name]
        if settings.learned_scales:
            return lsq_fake_quant(latent[name], plan.grids[name], log_scales[name])
        return plan.grids[name].fake_quant(latent[name])

    batches = training_batches(data.n_segments, settings.batch_size, plan.steps, settings.seed)
    curves: dict[str, list[float]] = {"loss": [], "nll": [], "kl": [], "lr": []}
    alpha = settings.distill_weight
    t0 = time.perf_counter()
    for step in tqdm(range(plan.steps), desc=method or plan.method, leave=False, disable=not progress):
        tokens = data.tokens[batches[step]].to(device)  # (b, t)
        mask = data.score_mask[batches[step]].to(device)
        lr_t = learning_rate_at(step, settings.lr, plan.steps, settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_t
        teacher_logits = None
        if alpha > 0:
            with torch.no_grad():
                teacher_logits = model(input_ids=tokens).logits
        substituted = {**frozen, **{f"{n}.weight": parameter_layout(modules[n], forward_weight(n))
                                    for n in plan.names}}
        with quantized_activations(model, settings.activations, settings.kv, plan.names):
            logits = torch.func.functional_call(model, substituted, kwargs={"input_ids": tokens}).logits
        nll_t, kl_t = token_losses(logits, tokens, mask, teacher_logits)
        loss = (1 - alpha) * nll_t + alpha * kl_t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", loss), ("nll", nll_t), ("kl", kl_t)):
            curves[key].append(float(value.detach()))
        curves["lr"].append(lr_t)

    with torch.no_grad():
        final_grids = ({n: learned_grid(plan.grids[n], log_scales[n]) for n in plan.names}
                       if settings.learned_scales else plan.grids)
        weights = {n: final_grids[n].round(latent[n].detach()) if settings.quantize else latent[n].detach().clone()
                   for n in plan.names}
    seconds = time.perf_counter() - t0
    extra = _summary(plan, weights, final_grids, curves, batches, seconds)
    extra["layer_mse_inputs"] = (f"full-precision model, {'all' if mse_data is None else mse_data.n_segments} "
                                 f"training sequences")
    extra.update(record or {})
    return QuantResult(
        weights=weights,
        format=plan.fmt if settings.quantize else None,
        method=method or plan.method,
        settings=_jsonable_settings({
            **settings.to_dict(), "steps_run": plan.steps, "data_order_seed": settings.seed,
            "format": plan.fmt.name if plan.fmt else None, "layers": layers if layers is None or isinstance(
                layers, str) else list(layers),
            "start": start.label if start is not None else ("rtn" if settings.quantize else "w0"),
            "optimizer": f"AdamW(betas={ADAMW_BETAS}, eps={ADAMW_EPS})",
            "schedule": "linear warm-up then cosine to 0", "trained": "quantized layers' weights only",
            "model_mode": "eval (no dropout)", "loss": "(1 - distill_weight) NLL + distill_weight KL(w0 || student)",
        }),
        base_model=model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__,
        base_fingerprint=weights_fingerprint(model, plan.names),
        calibration=data.provenance(),
        seconds=seconds,
        layer_mse=layer_mse(model, data if mse_data is None else mse_data, weights, inputs="reference"),
        extra=extra,
    )


def _summary(plan: _Plan, weights: dict[str, torch.Tensor], final_grids: dict[str, Grid],
             curves: dict[str, list[float]], batches: list[list[int]], seconds: float) -> dict[str, Any]:
    """``extra`` of a result: curves, data order, displacement and how many weights left the RTN point."""
    extra: dict[str, Any] = {
        "loss_curve": curves["loss"], "nll_curve": curves["nll"], "lr_curve": curves["lr"],
        "batch_order": batches, "seconds_per_step": seconds / plan.steps,
        "displacement_norm": math.sqrt(sum(float((weights[n] - plan.w0[n]).double().pow(2).sum()) for n in plan.names)),
    }
    if plan.settings.distill_weight > 0:
        extra["kl_curve"] = curves["kl"]
    if plan.grids:
        # QAFT: its own lattice point; control: the grid point nearest to the fine-tuned weights.
        changed = {n: int((plan.grids[n].round(weights[n]) if not plan.settings.quantize else weights[n])
                          .ne(plan.grids[n].round(plan.w0[n])).sum()) for n in plan.names}
        total = sum(w.numel() for w in weights.values())
        extra["changed_vs_rtn"] = sum(changed.values()) / total
        extra["changed_vs_rtn_per_layer"] = {n: changed[n] / weights[n].numel() for n in plan.names}
    if plan.settings.learned_scales:
        extra["learned_scales"] = {n: final_grids[n].scale.tolist() for n in plan.names}
    return extra


def _jsonable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.name if isinstance(v, (QuantFormat, ActivationQuant)) else v) for k, v in settings.items()}


# ------------------------------------------------------------------------------------------ public API
def qaft(
    model: nn.Module,
    calib: TokenSet,
    fmt: QuantFormat | str | None,
    *,
    lr: float | LearningRateSweep = DEFAULT_LR,
    epochs: float = DEFAULT_EPOCHS,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    seed: int = 0,
    start: QuantResult | None = None,
    distill_weight: float = 0.0,
    learned_scales: bool = False,
    layers: Sequence[str] | str | None = None,
    quantize: bool = True,
    activations: ActivationQuant | int | None = None,
    kv: ActivationQuant | int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    mse_data: TokenSet | None = None,
) -> QuantResult:
    """Quantization-aware fine-tuning on the calibration set: STE through the grid of w0, AdamW, cosine.

    Args:
        model: the model at w0 (left bit-exactly unchanged).
        calib: the calibration sequences (the same 128 GPTQ sees).
        fmt: weight format (``"int4"``, ``QuantFormat``...). With ``quantize=False`` only recorded.
        lr: peak learning rate, or a :class:`LearningRateSweep` from :func:`select_learning_rate` on this
            calibration set and format (its choice is used and the sweep stored in ``extra["lr_selection"]``).
            Default ``DEFAULT_LR`` (module docstring says why).
        epochs / steps: training length (``steps`` wins); default one pass, ``n / batch_size`` steps.
        batch_size, weight_decay, warmup_steps, seed: see :class:`FinetuneSettings`; ``seed`` fixes the data order.
        start: a result on the same grid and base (e.g. GPTQ) to start from instead of RTN.
        distill_weight: ``a`` in ``(1 - a) NLL + a KL(p_w0 || p_student)``.
        learned_scales: LSQ-style learned per-group scales (off by default; the result then lies on the
            learned lattice stored in ``extra["learned_scales"]``, not on the grid of w0).
        layers: layer names or glob patterns (default: every quantizable decoder linear); only these train.
        quantize: False runs the full-precision control (prefer :func:`fp_finetune`).
        activations, kv: train with activation / KV fake quantization (e.g. W4A8KV4 QAT; the teacher of
            the KL stays full precision).
        model_name: recorded as ``base_model``.
        mse_data: inputs of ``layer_mse`` (default ``calib``; e.g. its first sequences, which cost less).

    Returns:
        A :class:`QuantResult` (method ``qaft`` or ``fp-finetune``) whose ``extra`` holds ``loss_curve``,
        ``nll_curve``, ``lr_curve`` (per step), ``kl_curve`` (with distillation), ``batch_order``
        (sequence indices of every step), ``changed_vs_rtn`` (fraction of weights whose grid point differs
        from RTN's) and per layer, ``displacement_norm`` (``||w - w0||``, all trained layers),
        ``seconds_per_step``, and ``lr_selection`` when a sweep was passed. ``layer_mse`` is measured on
        the calibration inputs of the full-precision model.
    """
    record: dict[str, Any] = {}
    if isinstance(lr, LearningRateSweep):
        lr, record = _use_sweep(lr, calib, fmt, quantize), {"lr_selection": lr.to_dict()}
    settings = FinetuneSettings(lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, weight_decay=weight_decay,
                                warmup_steps=warmup_steps, seed=seed, distill_weight=distill_weight,
                                learned_scales=learned_scales, quantize=quantize, activations=activations, kv=kv)
    return finetune(model, calib, fmt, settings, layers=layers, start=start, model_name=model_name,
                    progress=progress, record=record, mse_data=mse_data)


def _use_sweep(sweep: LearningRateSweep, calib: TokenSet, fmt: QuantFormat | str | None, quantize: bool) -> float:
    fmt_name = parse_format(fmt).name if fmt is not None else None
    if sweep.calibration_hash != calib.content_hash:
        raise QAFTError(f"the learning-rate sweep was run on calibration data {sweep.calibration_hash}, "
                        f"not on this set ({calib.content_hash})")
    method = "qaft" if quantize else "fp-finetune"
    if sweep.method != method or (quantize and sweep.format != fmt_name):  # the control's format is only a label
        raise QAFTError(f"the learning-rate sweep was for {sweep.method} {sweep.format}, not {method} {fmt_name}")
    return sweep.best_lr


def fp_finetune(
    model: nn.Module,
    calib: TokenSet,
    fmt: QuantFormat | str | None = None,
    *,
    lr: float | LearningRateSweep = DEFAULT_LR,
    epochs: float = DEFAULT_EPOCHS,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    seed: int = 0,
    distill_weight: float = 0.0,
    layers: Sequence[str] | str | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> QuantResult:
    """The full-precision control of :func:`qaft`: the same loop, settings and data order, quantizer off.

    ``fmt`` is the format of the QAFT run it is paired with (recorded in ``settings["format"]``, and
    used for ``extra["changed_vs_rtn"]``: how many fine-tuned weights would now round to a different
    grid point); the result's ``format`` is None and its method ``fp-finetune``. With ``lr=0`` the
    weights are w0 bit-exactly.
    """
    return qaft(model, calib, fmt, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size,
                weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed, distill_weight=distill_weight,
                layers=layers, quantize=False, model_name=model_name, progress=progress)


def paired_control(model: nn.Module, calib: TokenSet, paired: QuantResult, *, progress: bool = True,
                   mse_data: TokenSet | None = None) -> QuantResult:
    """The fp-finetune control of a finished QAFT run: its exact settings, layers and data, quantizer off.

    ``paired`` must be a ``qaft`` result computed on ``calib`` (same content hash) and on this model
    (same base fingerprint). The control's ``settings`` equal the QAFT run's except ``quantize`` and
    ``start``, and ``extra["paired_with"]`` names the run it controls.
    """
    if paired.method != "qaft":
        raise QAFTError(f"paired_control needs a qaft result, got a {paired.label!r} result")
    if paired.calibration.get("data_hash") != calib.content_hash:
        raise QAFTError(f"the QAFT run used calibration data {paired.calibration.get('data_hash')!r}, "
                        f"not this set ({calib.content_hash})")
    fingerprint = weights_fingerprint(model, list(paired.weights))
    if paired.base_fingerprint != fingerprint:
        raise QAFTError(f"the QAFT run was on a base with fingerprint {paired.base_fingerprint!r}, this model has "
                        f"{fingerprint!r}")
    if paired.settings.get("activations") or paired.settings.get("kv") or paired.settings.get("learned_scales"):
        raise QAFTError("the QAFT run quantized activations/KV or learned scales: its control would not be "
                        "the same loop with only the weight quantizer switched off")
    s = paired.settings
    settings = FinetuneSettings(lr=s["lr"], epochs=s["epochs"], steps=s["steps"], batch_size=s["batch_size"],
                                weight_decay=s["weight_decay"], warmup_steps=s["warmup_steps"], seed=s["seed"],
                                distill_weight=s["distill_weight"], quantize=False)
    return finetune(model, calib, paired.format, settings, layers=list(paired.weights), progress=progress,
                    model_name=paired.base_model, record={"paired_with": {"label": paired.label, "settings": s}},
                    mse_data=mse_data)
