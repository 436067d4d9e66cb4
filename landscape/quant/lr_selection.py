"""Learning-rate selection for QAFT and its control on the calibration budget alone.

The calibration sequences are split (seeded) into a training part and a validation part (128 -> 112 + 16
by default). Every candidate rate trains :func:`landscape.quant.qaft.qaft` on the training part with the
run's :class:`~landscape.quant.qaft.FinetuneSettings` (lr aside), and the token-mean NLL (nats/token) of
the result on the validation part decides. Held-out text is never read. The outcome is a
:class:`~landscape.quant.qaft.LearningRateSweep`; ``FinetuneSettings(lr=sweep)`` trains at its choice on
all ``n`` sequences and stores the sweep with the result (``extra["lr_selection"]``).

The module docstring of :mod:`landscape.quant.qaft` reports what the selection picks on SmolLM2-135M.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.objectives import nll
from landscape.quant.capture import check_calibration
from landscape.quant.formats import QuantFormat
from landscape.quant.qaft import (
    DEFAULT_LR,
    FinetuneSettings,
    LearningRateSweep,
    QAFTError,
    best_learning_rate,
    jsonable_settings,
    plan_run,
    qaft,
)
from landscape.quant.result import QuantResult
from landscape.weights import Base, LayerSelection, as_base, swapped_weights

DEFAULT_LR_CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_VALIDATION_SEQUENCES = 16


@dataclass(frozen=True)
class LearningRateSweepSettings:
    """How :func:`select_learning_rate` searches, validated on construction.

    Attributes:
        candidates: learning rates to try (finite, >= 0; stored ascending).
        n_validation: calibration sequences held back to validate on (``1 .. n - 1`` of the ``n`` given).
        split_seed: seeds the split of the calibration sequences into training and validation parts.
        eval_batch_size: sequences per forward pass of the validation NLL (memory only).
    """

    candidates: tuple[float, ...] = DEFAULT_LR_CANDIDATES
    n_validation: int = DEFAULT_VALIDATION_SEQUENCES
    split_seed: int = 0
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        try:
            rates = tuple(sorted(float(c) for c in self.candidates))
        except (TypeError, ValueError):
            rates = ()
        if not rates or any(not math.isfinite(c) or c < 0 for c in rates):
            raise QAFTError(f"candidates must be a non-empty list of finite learning rates >= 0, "
                            f"got {self.candidates!r}")
        object.__setattr__(self, "candidates", rates)
        for name in ("n_validation", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QAFTError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise QAFTError(f"split_seed must be an integer, got {self.split_seed!r}")


def select_learning_rate(
    model: nn.Module | Base,
    calib: TokenSet,
    fmt: QuantFormat | str | None,
    settings: FinetuneSettings = FinetuneSettings(),
    search: LearningRateSweepSettings = LearningRateSweepSettings(),
    *,
    start: QuantResult | None = None,
    layers: LayerSelection = None,
    progress: bool = True,
) -> LearningRateSweep:
    """Pick the QAFT (or, with ``settings.quantize=False``, fp-finetune) learning rate on the calibration set.

    The calibration sequences are split (seeded by ``search.split_seed``) into ``n - n_validation`` training
    and ``n_validation`` validation sequences. For each candidate, :func:`~landscape.quant.qaft.qaft` trains
    on the training part with ``settings`` (same epochs/steps, batch size, seed, distillation...), ``start``
    and ``layers``, and the token-mean NLL of the result on the validation part is measured.

    Args:
        settings: the run's settings; the learning rates come from ``search.candidates``, so ``settings.lr``
            must be left at its default.
        search: the candidates and the split (:class:`LearningRateSweepSettings`).

    Returns:
        A :class:`~landscape.quant.qaft.LearningRateSweep`; ``replace(settings, lr=sweep)`` (or
        ``FinetuneSettings(lr=sweep, ...)``) trains on all ``n`` sequences at the chosen rate and stores the
        sweep in ``result.extra["lr_selection"]``.
    """
    base = as_base(model)
    check_calibration(base.model, calib)
    if not isinstance(settings, FinetuneSettings) or not isinstance(search, LearningRateSweepSettings):
        raise QAFTError(f"settings must be a FinetuneSettings and search a LearningRateSweepSettings, got "
                        f"{type(settings).__name__} and {type(search).__name__}")
    if settings.lr != DEFAULT_LR or settings.lr_sweep is not None:
        raise QAFTError(f"unknown settings ['lr'] for select_learning_rate: learning rates go in the "
                        f"candidates of its LearningRateSweepSettings (leave settings.lr at {DEFAULT_LR:g}, "
                        f"got {settings.lr:g})")
    n_validation, rates = search.n_validation, list(search.candidates)
    if not n_validation < calib.n_segments:
        raise QAFTError(f"n_validation must be an integer in 1..{calib.n_segments - 1} "
                        f"(the calibration set has {calib.n_segments} sequences), got {n_validation!r}")
    permutation = torch.randperm(calib.n_segments, generator=torch.Generator().manual_seed(search.split_seed))
    validation_idx = sorted(permutation[:n_validation].tolist())
    train_idx = sorted(permutation[n_validation:].tolist())
    train_set, validation_set = calib.subset(train_idx), calib.subset(validation_idx)
    # Check every setting, the layers, the format and the start point before anything trains.
    plan = plan_run(base, train_set, fmt, layers, start, replace(settings, lr=rates[0]))
    # Each candidate's layer MSE is not used by the selection: measure it on one sequence, not on all of them.
    mse_data = train_set.subset([0])

    t0 = time.perf_counter()
    with torch.no_grad():
        start_weights = {n: plan.start_model(n) for n in plan.names}
    with swapped_weights(base.model, start_weights):
        start_nll = nll(base.model, validation_set, batch_size=search.eval_batch_size).value
    values = []
    for lr in tqdm(rates, desc="lr sweep", leave=False, disable=not progress):
        result = qaft(base, train_set, fmt, replace(settings, lr=lr), start=start, layers=layers,
                      progress=False, mse_data=mse_data)
        with swapped_weights(base.model, result.weights):
            values.append(nll(base.model, validation_set, batch_size=search.eval_batch_size).value)
    best = best_learning_rate(rates, values)
    recorded: dict[str, Any] = {k: v for k, v in settings.to_dict().items() if k != "lr"}
    recorded["layers"] = layers if layers is None or isinstance(layers, str) else list(layers)
    recorded["start"] = start.label if start is not None else None
    return LearningRateSweep(
        candidates=tuple(rates), validation_nll=tuple(values), start_validation_nll=start_nll, best_lr=best,
        train_sequences=tuple(train_idx), validation_sequences=tuple(validation_idx),
        calibration_hash=calib.content_hash, format=plan.fmt.name if plan.fmt else None,
        method=plan.method, settings=jsonable_settings(recorded), seconds=time.perf_counter() - t0)
