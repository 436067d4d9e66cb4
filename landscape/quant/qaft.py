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
QAFT's gain that is plain adaptation to the calibration text can be measured: :func:`fp_finetune` takes the
very :class:`FinetuneSettings` of the QAFT run it controls. With ``lr = 0`` it returns w0 bit-exactly.

Conventions:

* Only the quantized layers' weights train (in the ``(out, in)`` orientation of
  :func:`landscape.models.weight_matrix`); every other parameter is frozen. The model itself is never
  written to: its parameters are frozen for the pass (:func:`landscape.quant.training.frozen_parameters`),
  the trained layers computing with their fake-quantized latent weights, each made when the layer runs and
  again in the backward pass (:func:`landscape.quant.training.weights_made_when_used`), so the model holds w0
  bit-exactly during, after, and on an exception out of the loop.
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
on the calibration budget only, never on held-out text
(:func:`landscape.quant.lr_selection.select_learning_rate`), and pass the sweep as the learning rate,
``FinetuneSettings(lr=sweep)`` (it is then stored with the result; ``analyses/lr_sweep.py`` runs the sweeps).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.memory import PeriodicRelease
from landscape.objectives import layer_mse
from landscape.quant.activations import ActivationQuant, as_activation_quant, quantized_activations
from landscape.quant.capture import check_calibration, resolve_layers
from landscape.quant.formats import Grid, QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult
from landscape.quant.training import (
    frozen_parameters,
    learned_grid,
    learning_rate_at,
    lsq_fake_quant,
    micro_batches,
    recomputed_blocks,
    scored_tokens,
    token_losses,
    training_batches,
    weights_made_when_used,
)
from landscape.weights import (
    Base,
    LayerSelection,
    as_base,
    decoder_blocks,
    get_layer,
    weight_matrix,
    working_dtype,
)

DEFAULT_LR = 3e-4
DEFAULT_EPOCHS = 1.0
DEFAULT_BATCH_SIZE = 4
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
OPTIMIZERS = ("adamw", "sgd")


class QAFTError(ValueError):
    """Invalid fine-tuning settings, or a start point that does not belong to this model and format."""


# --------------------------------------------------------------------------------------------- settings
def best_learning_rate(rates: Sequence[float], values: Sequence[float]) -> float:
    """The rate of the lowest validation NLL; on a tie, the first (``rates`` ascending: the smallest)."""
    return rates[min(range(len(rates)), key=lambda i: (values[i], i))]


@dataclass(frozen=True)
class LearningRateSweep:
    """A learning-rate selection on the calibration budget only (its fields are JSON values).

    Attributes:
        candidates: learning rates tried, ascending.
        validation_nll: token-mean NLL (nats/token) on the held-back calibration sequences after training
            with each candidate (snapped onto the grid for QAFT).
        start_validation_nll: the same NLL at the starting point (RTN, the start result, or w0).
        best_lr: the candidate with the lowest validation NLL (the smallest such rate on a tie).
        train_sequences, validation_sequences: indices into the calibration set of the two parts.
        calibration_hash: content hash of the calibration set the split was made from.
        format: weight format name (None for the full-precision control), method: ``qaft`` or ``fp-finetune``.
        settings: the fine-tuning settings of every candidate run (lr aside), with its layers and start
            point; seconds: wall time.

    Made by :func:`landscape.quant.lr_selection.select_learning_rate`; given as the learning rate of a run,
    ``FinetuneSettings(lr=sweep)``, its ``best_lr`` trains and the sweep is stored in
    ``extra["lr_selection"]``.
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

    @classmethod
    def combined(cls, parts: Sequence[LearningRateSweep]) -> LearningRateSweep:
        """One sweep from sweeps over disjoint candidates with the same split, start and settings (e.g. the
        jobs of a fanned-out sweep, one candidate each): the candidates ascending, the best chosen as
        :func:`~landscape.quant.lr_selection.select_learning_rate` chooses, the seconds summed. Equal to one
        sweep over all the candidates (each candidate's run depends on nothing else)."""
        def shared(p: LearningRateSweep) -> tuple:
            return (p.start_validation_nll, tuple(p.train_sequences), tuple(p.validation_sequences),
                    p.calibration_hash, p.format, p.method, json.dumps(p.settings, sort_keys=True))

        if not parts:
            raise QAFTError("combined needs at least one sweep")
        differing = [i for i, p in enumerate(parts) if shared(p) != shared(parts[0])]
        if differing:
            raise QAFTError(f"sweeps {differing} differ from sweep 0 in their split, start, format or "
                            f"settings: only sweeps of one selection over different candidates combine")
        pairs = sorted((lr, v) for p in parts for lr, v in zip(p.candidates, p.validation_nll))
        rates = [lr for lr, _ in pairs]
        if len(set(rates)) != len(rates):
            raise QAFTError(f"candidates appear in several sweeps: {sorted(rates)}")
        values = [v for _, v in pairs]
        best = best_learning_rate(rates, values)
        first = parts[0]
        return replace(first, candidates=tuple(rates), validation_nll=tuple(values), best_lr=best,
                       train_sequences=tuple(first.train_sequences),
                       validation_sequences=tuple(first.validation_sequences),
                       seconds=float(sum(p.seconds for p in parts)))

    def table(self) -> str:
        """The sweep as a Markdown table (validation NLL per learning rate, the choice marked)."""
        rows = ["| lr | validation NLL | vs start |", "|---|---|---|",
                f"| start | {self.start_validation_nll:.4f} | 0 |"]
        for lr, value in zip(self.candidates, self.validation_nll):
            mark = " **chosen**" if lr == self.best_lr else ""
            rows.append(f"| {lr:g}{mark} | {value:.4f} | {value - self.start_validation_nll:+.4f} |")
        return "\n".join(rows)


@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of one QAFT / fp-finetune / LLM-QAT run, validated on construction.

    One object describes a run whole: :func:`qaft`, its control :func:`fp_finetune` (the same settings, the
    quantizer switched off), :func:`landscape.quant.lr_selection.select_learning_rate` and
    :func:`landscape.quant.llm_qat.llm_qat` all take it.

    Attributes:
        lr: peak AdamW learning rate (>= 0; units of weight per step for Adam's normalised update), or a
            :class:`LearningRateSweep` chosen on this calibration set: its ``best_lr`` becomes ``lr`` and the
            sweep is kept in ``lr_sweep`` (checked against the data and format of the run, and stored in the
            result's ``extra["lr_selection"]``).
        epochs: passes over the training sequences (used when ``steps`` is None; > 0).
        steps: optimiser steps (>= 1); overrides ``epochs``.
        batch_size: sequences per step.
        weight_decay: decoupled AdamW weight decay of the latent weights (towards 0, not towards w0).
        warmup_steps: linear warm-up steps before the cosine decay (0 .. steps - 1).
        seed: seeds the data order (one permutation of the sequences per epoch).
        distill_weight: ``a`` in ``(1 - a) NLL + a KL``; 0 = plain NLL, 1 = pure logit distillation.
        learned_scales: also learn one multiplicative scale per grid group (LSQ-style, see
            :func:`landscape.quant.training.lsq_fake_quant`).
        quantize: False switches the quantizer off (the full-precision control; :func:`fp_finetune` sets it).
        activations, kv: activation / key-value fake quantization during training (student only); an int
            ``b`` means per-token asymmetric ``b``-bit quantization.
        lr_sweep: the sweep that chose ``lr`` (set from ``lr``; given explicitly, ``lr`` must be its
            ``best_lr``).
        optimizer: ``"adamw"`` (the default: latent weights, gradients and two moments, four float32
            copies of the trained layers) or ``"sgd"`` with heavy-ball ``momentum`` (one moment: three copies,
            for models where AdamW's state does not fit). SGD's ``lr`` is in weight per unit gradient, not
            AdamW's weight per step: choose it anew (``--lr auto``).
        micro_batch_size: sequences per forward and backward pass (``None``: the whole batch). Memory only:
            a step's gradient is summed over its micro-batches, each normalised by the whole batch's scored
            tokens, so it equals the whole batch's up to float rounding; the activations held shrink by
            ``batch_size / micro_batch_size``.
        recompute_blocks: keep only each decoder block's input through the backward pass and run the block
            again there (activation checkpointing: :func:`~landscape.quant.training.recomputed_blocks`).
            Memory only, bit for bit the same result, for one more forward pass per backward pass.
    """

    lr: float | LearningRateSweep = DEFAULT_LR
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
    lr_sweep: LearningRateSweep | None = field(default=None, compare=False, repr=False)
    optimizer: str = "adamw"
    momentum: float = 0.9
    micro_batch_size: int | None = None
    recompute_blocks: bool = False

    def __post_init__(self) -> None:
        def is_number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if isinstance(self.lr, LearningRateSweep):
            if self.lr_sweep is not None and self.lr_sweep is not self.lr:
                raise QAFTError("lr is a learning-rate sweep and lr_sweep another one: give one sweep")
            object.__setattr__(self, "lr_sweep", self.lr)
            object.__setattr__(self, "lr", self.lr.best_lr)
        elif self.lr_sweep is not None:
            if not isinstance(self.lr_sweep, LearningRateSweep):
                raise QAFTError(f"lr_sweep must be a LearningRateSweep or None, got "
                                f"{type(self.lr_sweep).__name__}")
            if self.lr != self.lr_sweep.best_lr:
                raise QAFTError(f"lr={self.lr!r} is not the learning rate the sweep chose "
                                f"({self.lr_sweep.best_lr!r})")
        if not is_number(self.lr) or self.lr < 0:
            raise QAFTError(f"lr must be a finite number >= 0 (e.g. {DEFAULT_LR}), got {self.lr!r}")
        if not is_number(self.epochs) or self.epochs <= 0:
            raise QAFTError(f"epochs must be a finite number > 0, got {self.epochs!r}")
        if self.steps is not None and (not is_int(self.steps) or self.steps < 1):
            raise QAFTError(f"steps must be an integer >= 1 (or None to use epochs), got {self.steps!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise QAFTError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.micro_batch_size is not None and (not is_int(self.micro_batch_size)
                                                  or not 1 <= self.micro_batch_size <= self.batch_size):
            raise QAFTError(f"micro_batch_size must be an integer in 1..batch_size={self.batch_size} "
                            f"(or None: the whole batch), got {self.micro_batch_size!r}")
        if not isinstance(self.recompute_blocks, bool):
            raise QAFTError(f"recompute_blocks must be True or False, got {self.recompute_blocks!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise QAFTError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise QAFTError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not is_int(self.seed):
            raise QAFTError(f"seed must be an integer, got {self.seed!r}")
        if not is_number(self.distill_weight) or not 0 <= self.distill_weight <= 1:
            raise QAFTError(f"distill_weight must be in [0, 1] (0: NLL only, 1: KL only), got "
                            f"{self.distill_weight!r}")
        if self.optimizer not in OPTIMIZERS:
            raise QAFTError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise QAFTError(f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("activations", "kv"):  # an int b means per-token asymmetric b-bit quantization
            object.__setattr__(self, name, as_activation_quant(getattr(self, name)))
        if not self.quantize and (self.learned_scales or self.activations or self.kv):
            raise QAFTError("the full-precision control (quantize=False) switches every quantizer off: "
                            "learned_scales must be False and activations/kv None")

    @property
    def method(self) -> str:
        """The method these settings run: ``qaft``, or ``fp-finetune`` with the quantizer off."""
        return "qaft" if self.quantize else "fp-finetune"

    def steps_for(self, n_sequences: int) -> int:
        """Optimiser steps on ``n_sequences`` training sequences: ``steps``, or
        ``round(epochs * n / batch_size)`` (at least 1)."""
        if self.batch_size > n_sequences:
            raise QAFTError(f"batch_size={self.batch_size} exceeds the {n_sequences} training sequences")
        steps = self.steps
        if steps is None:
            steps = max(1, round(self.epochs * n_sequences / self.batch_size))
        if self.warmup_steps >= steps:
            raise QAFTError(f"warmup_steps={self.warmup_steps} must be smaller than the number of steps "
                            f"({steps})")
        return steps

    def to_dict(self) -> dict[str, Any]:
        """The hyper-parameters as recorded in a result's ``settings`` (the sweep is recorded in
        ``extra``)."""
        d = asdict(self)
        del d["lr_sweep"]
        if self.optimizer == "adamw":  # as recorded before SGD existed: the stores of those runs still match
            del d["optimizer"], d["momentum"]
        if self.micro_batch_size is None:  # likewise: recorded only when set
            del d["micro_batch_size"]
        del d["recompute_blocks"]  # how memory was spent, not what was computed (the same bits either way)
        d["activations"] = self.activations.name if self.activations else None
        d["kv"] = self.kv.name if self.kv else None
        return d

    @classmethod
    def from_recorded(cls, recorded: dict[str, Any]) -> FinetuneSettings:
        """The settings of a finished run that quantized weights only, from its result's ``settings``."""
        if recorded.get("activations") or recorded.get("kv") or recorded.get("learned_scales"):
            raise QAFTError("the run quantized activations/KV or learned scales: its settings cannot be "
                            "rebuilt from the record")
        keys = ("lr", "epochs", "steps", "batch_size", "weight_decay", "warmup_steps", "seed",
                "distill_weight", "quantize")
        sgd = str(recorded.get("optimizer", "")).startswith("SGD")
        return cls(**{k: recorded[k] for k in keys}, optimizer="sgd" if sgd else "adamw",
                   momentum=recorded.get("momentum", 0.9))

    def describe_optimizer(self) -> str:
        if self.optimizer == "sgd":
            return f"SGD(momentum={self.momentum})"
        return f"AdamW(betas={ADAMW_BETAS}, eps={ADAMW_EPS})"

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimiser of these settings over parameter ``groups`` (each with its own weight decay)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        return torch.optim.AdamW(groups, lr=self.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)


# ------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class RunPlan:
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
        return self.settings.method

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
        """The weights of the model before training: the start result, RTN (``grid.round(w0)``) or w0
        (control)."""
        latent = self.start_point(name)
        return self.grids[name].round(latent) if self.settings.quantize else latent


def plan_run(base: Base, data: TokenSet, fmt: QuantFormat | str | None, layers: LayerSelection,
             start: QuantResult | None, settings: FinetuneSettings) -> RunPlan:
    """Check everything about a run before any training: data, format, steps, layers and start point."""
    model = base.model
    check_calibration(model, data)
    fmt = parse_format(fmt) if fmt is not None else None
    if settings.quantize and fmt is None:
        raise QAFTError("QAFT needs a weight format (e.g. 'int4'); fmt=None is only for fp-finetune")
    steps = settings.steps_for(data.n_segments)
    names = resolve_layers(model, layers, fmt)
    # (out, in) views of the model's own weights, not copies: training never writes the model's parameters
    # (its layers run with made weights: weights_made_when_used), so w0 stays as it is and costs no memory
    w0 = {n: weight_matrix(get_layer(model, n)).detach() for n in names}
    grids = {n: make_grid(w0[n], fmt, n) for n in names} if fmt is not None else {}
    if start is not None:
        _check_start(base, start, fmt, names, grids, settings)
    return RunPlan(names, w0, grids, start, fmt, settings, steps)


def _check_start(base: Base, start: QuantResult, fmt: QuantFormat | None, names: list[str],
                 grids: dict[str, Grid], settings: FinetuneSettings) -> None:
    if not isinstance(start, QuantResult):
        raise QAFTError(f"start must be a QuantResult (e.g. from rtn or gptq), got {type(start).__name__}")
    if not settings.quantize:
        raise QAFTError("fp-finetune starts at w0 (it is the full-precision control); start= is for QAFT "
                        "only")
    if start.format is None or start.format.name != fmt.name:
        raise QAFTError(f"start is a {start.label!r} result in format "
                        f"{start.format.name if start.format else None!r}; QAFT was asked for {fmt.name!r}")
    missing = [n for n in names if n not in start.weights]
    if missing:
        raise QAFTError(f"start ({start.label}) has no weights for {len(missing)} of the layers to train, "
                        f"e.g. {missing[:3]}; pass layers= matching its {len(start.weights)} layers")
    fingerprint = base.fingerprint(list(start.weights))
    if start.base_fingerprint != fingerprint:
        raise QAFTError(f"start ({start.label}) was computed on base {start.base_model!r} with fingerprint "
                        f"{start.base_fingerprint!r}, but this model's weights have fingerprint "
                        f"{fingerprint!r}")
    for n in names:
        w = start.weights[n]
        if tuple(w.shape) != tuple(grids[n].shape):
            raise QAFTError(f"start ({start.label}) weight of {n!r} has shape {tuple(w.shape)}, "
                            f"the layer has {tuple(grids[n].shape)}")
        if not grids[n].contains(w.to(grids[n].scale)):
            raise QAFTError(f"start ({start.label}) weight of {n!r} is not on the {fmt.name} grid of w0 "
                            f"(e.g. a LoRC-corrected result); QAFT starts from lattice points")


# ------------------------------------------------------------------------------------------- the loop
def qaft(
    model: nn.Module | Base,
    calib: TokenSet,
    fmt: QuantFormat | str | None,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    start: QuantResult | None = None,
    layers: LayerSelection = None,
    progress: bool = True,
    mse_data: TokenSet | None = None,
) -> QuantResult:
    """Quantization-aware fine-tuning on the calibration set: STE through the grid of w0, AdamW, cosine.

    The one training loop (module docstring): :func:`fp_finetune` is this loop with
    ``settings.quantize=False``, and :func:`landscape.quant.llm_qat.llm_qat` runs it on generated text.

    Args:
        model: the model at w0 (left bit-exactly unchanged: training never writes its parameters), or its
            :class:`~landscape.weights.Base` (whose label is recorded as ``base_model``; default label: the
            config's ``name_or_path``).
        calib: the training sequences: the calibration set (the same 128 GPTQ sees), or generated text.
        fmt: weight format (``"int4"``, ``QuantFormat``...). With ``settings.quantize=False`` only recorded
            (as the paired format; it then also gives ``extra["changed_vs_rtn"]``).
        settings: the run's hyper-parameters (:class:`FinetuneSettings`; default learning rate
            ``DEFAULT_LR``, the module docstring says why). ``FinetuneSettings(lr=sweep)`` trains at a
            learning-rate sweep's choice; the sweep must have been run on ``calib`` for this method and
            format.
        start: a result on the same grid and base (e.g. GPTQ) to start from instead of RTN (QAFT only).
        layers: layer names or glob patterns (default: every quantizable decoder linear); only these train.
        progress: show a progress bar over the steps.
        mse_data: inputs of ``layer_mse`` (default ``calib``; e.g. its first sequences, which cost less).

    Returns:
        A :class:`QuantResult` (method ``qaft`` or ``fp-finetune``; weights in the model's dtype and device)
        whose ``extra`` holds ``loss_curve``, ``nll_curve``, ``lr_curve`` (per step), ``kl_curve`` (with
        distillation), ``batch_order`` (sequence indices of every step), ``changed_vs_rtn`` (fraction of
        weights whose grid point differs from RTN's) and per layer, ``displacement_norm`` (``||w - w0||``, all
        trained layers), ``seconds_per_step``, and ``lr_selection`` when the learning rate came from a sweep.
        ``layer_mse`` is measured on the inputs of the full-precision model.
    """
    if not isinstance(settings, FinetuneSettings):
        raise QAFTError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    base = as_base(model)
    model = base.model
    record: dict[str, Any] = {}
    if settings.lr_sweep is not None:
        _check_sweep(settings.lr_sweep, calib, fmt, settings.quantize)
        record["lr_selection"] = settings.lr_sweep.to_dict()
    plan = plan_run(base, calib, fmt, layers, start, settings)
    device = next(iter(plan.w0.values())).device
    modules = {n: get_layer(model, n) for n in plan.names}
    # (out, in) latent weights; a bfloat16 / float16 model trains float32 master weights (an AdamW update of
    # lr 1e-5 is far below a bf16 weight's resolution), cast to the model's dtype in each forward pass
    model_dtype = next(iter(plan.w0.values())).dtype
    latent = {n: plan.start_point(n).to(working_dtype(model_dtype)).clone().requires_grad_(True)
              for n in plan.names}
    log_scales = ({n: torch.zeros_like(plan.grids[n].scale, requires_grad=True) for n in plan.names}
                  if settings.learned_scales else {})
    optimizer = settings.make_optimizer(
        [{"params": list(latent.values()), "weight_decay": settings.weight_decay},
         {"params": list(log_scales.values()), "weight_decay": 0.0}])

    def forward_weight(name: str) -> torch.Tensor:
        if not settings.quantize:
            return latent[name].to(model_dtype)
        if settings.learned_scales:
            return lsq_fake_quant(latent[name], plan.grids[name], log_scales[name]).to(model_dtype)
        return plan.grids[name].fake_quant(latent[name]).to(model_dtype)

    release_heap = PeriodicRelease()
    recomputed = decoder_blocks(model) if settings.recompute_blocks else ()

    def forward_backward(rows: list[int], n_scored: float | None) -> tuple[float, float, float]:
        """Loss, NLL and KL of ``rows`` (each a sum over its tokens / ``n_scored``, or a token mean over its
        own tokens if ``None``), its gradient added to the latent weights' ``.grad``."""
        tokens = calib.tokens[rows].to(device)  # (b, t)
        mask = calib.score_mask[rows].to(device)
        teacher_logits = None
        if alpha > 0:
            with torch.no_grad():
                teacher_logits = model(input_ids=tokens).logits
        # the backward pass inside too: recomputed blocks run again with the same hooks and made weights
        with (frozen_parameters(model),
              quantized_activations(model, settings.activations, settings.kv, plan.names),
              weights_made_when_used(modules, forward_weight), recomputed_blocks(recomputed)):
            logits = model(input_ids=tokens, use_cache=False).logits
            nll_t, kl_t = token_losses(logits, tokens, mask, teacher_logits, n_scored)
            loss = (1 - alpha) * nll_t + alpha * kl_t
            loss.backward()
        release_heap()  # the pass's freed activations: the next pass's peak is not on top of them
        return float(loss.detach()), float(nll_t.detach()), float(kl_t.detach())

    batches = training_batches(calib.n_segments, settings.batch_size, plan.steps, settings.seed)
    curves: dict[str, list[float]] = {"loss": [], "nll": [], "kl": [], "lr": []}
    alpha = settings.distill_weight
    t0 = time.perf_counter()
    for step in tqdm(range(plan.steps), desc=plan.method, leave=False, disable=not progress):
        lr_t = learning_rate_at(step, settings.lr, plan.steps, settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_t
        optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(batches[step], settings.micro_batch_size)
        # one micro-batch: the token mean of the batch, as before micro-batches existed (bit for bit)
        n_scored = scored_tokens(calib, batches[step]) if len(chunks) > 1 else None
        loss = nll_t = kl_t = 0.0
        for rows in chunks:
            parts = forward_backward(rows, n_scored)
            loss, nll_t, kl_t = loss + parts[0], nll_t + parts[1], kl_t + parts[2]
        optimizer.step()
        for key, value in (("loss", loss), ("nll", nll_t), ("kl", kl_t)):
            curves[key].append(value)
        curves["lr"].append(lr_t)

    optimizer.zero_grad(set_to_none=True)
    del optimizer  # its moments and the gradients: the result and its layer-MSE pass need neither
    with torch.no_grad():
        final_grids = ({n: learned_grid(plan.grids[n], log_scales[n]) for n in plan.names}
                       if settings.learned_scales else plan.grids)
        weights = {n: (final_grids[n].round(latent[n].detach()) if settings.quantize
                       else latent[n].detach().clone()).to(model_dtype) for n in plan.names}
    latent.clear()  # the latent weights, once their lattice points are taken
    seconds = time.perf_counter() - t0
    extra = _summary(plan, weights, final_grids, curves, batches, seconds)
    n_mse = "all" if mse_data is None else mse_data.n_segments
    extra["layer_mse_inputs"] = f"full-precision model, {n_mse} training sequences"
    extra.update(record)
    return QuantResult(
        weights=weights,
        format=plan.fmt if settings.quantize else None,
        method=plan.method,
        settings=jsonable_settings({
            **settings.to_dict(), "steps_run": plan.steps, "data_order_seed": settings.seed,
            "format": plan.fmt.name if plan.fmt else None, "layers": layers if layers is None or isinstance(
                layers, str) else list(layers),
            "start": start.label if start is not None else ("rtn" if settings.quantize else "w0"),
            "optimizer": settings.describe_optimizer(),
            "schedule": "linear warm-up then cosine to 0", "trained": "quantized layers' weights only",
            "model_mode": "eval (no dropout)",
            "loss": "(1 - distill_weight) NLL + distill_weight KL(w0 || student)",
        }),
        base_model=base.label,
        base_fingerprint=base.fingerprint(plan.names),
        calibration=calib.provenance(),
        seconds=seconds,
        layer_mse=layer_mse(model, calib if mse_data is None else mse_data, weights, inputs="reference"),
        extra=extra,
    )


def _check_sweep(sweep: LearningRateSweep, calib: TokenSet, fmt: QuantFormat | str | None,
                 quantize: bool) -> None:
    """Refuse a learning-rate sweep made on other calibration data, or for another method or format."""
    fmt_name = parse_format(fmt).name if fmt is not None else None
    if sweep.calibration_hash != calib.content_hash:
        raise QAFTError(f"the learning-rate sweep was run on calibration data {sweep.calibration_hash}, "
                        f"not on this set ({calib.content_hash})")
    method = "qaft" if quantize else "fp-finetune"
    # the control's format is only a label
    if sweep.method != method or (quantize and sweep.format != fmt_name):
        raise QAFTError(f"the learning-rate sweep was for {sweep.method} {sweep.format}, not {method} "
                        f"{fmt_name}")


def _summary(plan: RunPlan, weights: dict[str, torch.Tensor], final_grids: dict[str, Grid],
             curves: dict[str, list[float]], batches: list[list[int]], seconds: float) -> dict[str, Any]:
    """``extra`` of a result: curves, data order, displacement and how many weights left the RTN point."""
    extra: dict[str, Any] = {
        "loss_curve": curves["loss"], "nll_curve": curves["nll"], "lr_curve": curves["lr"],
        "batch_order": batches, "seconds_per_step": seconds / plan.steps,
        "displacement_norm": math.sqrt(sum(float((weights[n] - plan.w0[n]).double().pow(2).sum())
                                           for n in plan.names)),
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


def jsonable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with formats and activation quantizers replaced by their names (JSON-ready)."""
    return {k: (v.name if isinstance(v, (QuantFormat, ActivationQuant)) else v) for k, v in settings.items()}


# ------------------------------------------------------------------------------ full-precision control
def fp_finetune(
    model: nn.Module | Base,
    calib: TokenSet,
    fmt: QuantFormat | str | None = None,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    layers: LayerSelection = None,
    progress: bool = True,
    mse_data: TokenSet | None = None,
) -> QuantResult:
    """The full-precision control of :func:`qaft`: the same loop, settings and data order, quantizer off.

    ``settings`` are those of the QAFT run it controls (its ``quantize`` is switched off here; a run with
    learned scales or quantized activations has no such control and is refused). ``fmt`` is the format of
    that run (recorded in ``settings["format"]``, and used for ``extra["changed_vs_rtn"]``: how many
    fine-tuned weights would now round to a different grid point); the result's ``format`` is None and its
    method ``fp-finetune``. Its weights do not depend on ``fmt``, and with ``lr=0`` they are w0 bit-exactly.
    """
    if not isinstance(settings, FinetuneSettings):
        raise QAFTError(f"settings must be a FinetuneSettings, got {type(settings).__name__}")
    return qaft(model, calib, fmt, replace(settings, quantize=False), layers=layers, progress=progress,
                mse_data=mse_data)


def paired_control(model: nn.Module | Base, calib: TokenSet, paired: QuantResult, *, progress: bool = True,
                   mse_data: TokenSet | None = None) -> QuantResult:
    """The fp-finetune control of a finished QAFT run: its exact settings, layers and data, quantizer off.

    ``paired`` must be a ``qaft`` result computed on ``calib`` (same content hash) and on this model
    (same base fingerprint). The control's ``settings`` equal the QAFT run's except ``quantize`` and
    ``start``, ``base_model`` is the run's, and ``extra["paired_with"]`` names the run it controls. Its
    weights are those of ``fp_finetune(model, calib, fmt, settings, layers=...)`` with the run's settings.
    """
    if paired.method != "qaft":
        raise QAFTError(f"paired_control needs a qaft result, got a {paired.label!r} result")
    if paired.calibration.get("data_hash") != calib.content_hash:
        raise QAFTError(f"the QAFT run used calibration data {paired.calibration.get('data_hash')!r}, "
                        f"not this set ({calib.content_hash})")
    base = as_base(model)
    fingerprint = base.fingerprint(list(paired.weights))
    if paired.base_fingerprint != fingerprint:
        raise QAFTError(f"the QAFT run was on a base with fingerprint {paired.base_fingerprint!r}, this "
                        f"model has {fingerprint!r}")
    recorded = paired.settings
    if recorded.get("activations") or recorded.get("kv") or recorded.get("learned_scales"):
        raise QAFTError("the QAFT run quantized activations/KV or learned scales: its control would not be "
                        "the same loop with only the weight quantizer switched off")
    settings = FinetuneSettings.from_recorded(recorded)
    control = fp_finetune(base, calib, paired.format, settings, layers=list(paired.weights),
                          progress=progress, mse_data=mse_data)
    paired_with = {"label": paired.label, "settings": recorded}
    return replace(control, base_model=paired.base_model, extra={**control.extra, "paired_with": paired_with})
