"""Curvature and slope of the NLL along one direction, at w0 and along the straight path from it.

For a direction ``d`` (over any subset of the quantizable layers; the measurement is taken over exactly the
direction's layers, :func:`~landscape.curvature.space.direction_space`) and its unit vector ``u = d / ||d||``:

* :func:`hvp_rayleigh_quotient`: ``u^T H u`` from one Hessian (or GGN) product per batch;
* :func:`gradient_slope`: the slope ``g^T u`` from one backward pass per batch (nats/token per weight unit);
* :func:`finite_difference_curvature`: ``d2/dh2 NLL(w + h u)`` from central differences of the NLL (forward
  passes only), Richardson-extrapolated;
* :func:`path_curvature`: ``u^T H(w0 + t d) u`` (and the slope) at points of the path ``w0 + t d``.

Curvatures are in nats/token per squared weight unit. Each estimate is a ratio of sums over independent units
(batches, or segments for finite differences), so the NLL's bootstrap applies
(:func:`landscape.stats.token_mean_interval`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.curvature.operators import Batch, NLLProblem, nll_operator, quadratic_form
from landscape.curvature.space import (
    CurvatureError,
    Direction,
    WeightSpace,
    check_interval_request,
    direction_norm,
    direction_space,
    direction_tensors,
)
from landscape.curvature.stored import StoredTask
from landscape.objectives import segment_nll_sums
from landscape.stats import Interval, token_mean_interval
from landscape.store import StoreRecord
from landscape.weights import get_layer, layer_weights, swapped_weights, weight_matrix, working_dtype

Method = Literal["hvp", "finite-difference", "gradient"]

# Step h along the unit direction (weight-norm units) of the Richardson-extrapolated central second difference
# of the NLL, balancing O(h^4) truncation against about 6 eps L / h^2 roundoff (eps: machine epsilon, L ~ 5
# nats/token): about 1e-8 in float64 at 1e-3, about 2e-2 nats/token per unit^2 in float32 at 1e-2.
DEFAULT_FD_STEP: dict[torch.dtype, float] = {torch.float64: 1e-3, torch.float32: 1e-2}


# ----------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class DirectionalCurvature(StoredTask):
    """Curvature of the NLL along a unit direction ``u = d / ||d||``: ``u^T H u`` (nats/token per squared
    weight unit), from Hessian-vector products or from a finite difference of the NLL.

    The estimate is a ratio of sums over independent units (batches of segments for ``hvp``, single
    segments for ``finite-difference``): ``value = sum(unit_sums) / sum(unit_tokens)``, where
    ``unit_sums[i]`` is ``u^T H_i u`` for the *summed* NLL of unit ``i``. That makes the same bootstrap as
    for an NLL apply (:func:`landscape.stats.token_mean_interval`).

    Attributes:
        method: ``hvp`` (Rayleigh quotient from exact products) or ``finite-difference``
            (``(L(w+h u) - 2 L(w) + L(w-h u)) / h^2`` with ``h = step``); ``gradient`` marks the *first*
            directional derivative ``g^T u`` of :meth:`landscape.curvature.Curvature.slope` (same units per
            weight unit, not squared).
        operator: ``hessian`` or ``ggn`` (``hvp`` only; ``hessian`` for finite differences, ``gradient`` for
            slopes).
        unit_sums: ``(U,)`` per-unit sums; ``unit_tokens``: ``(U,)`` scored tokens of each unit.
        interval: bootstrap interval over the units, or ``None`` when not requested.
        direction_norm: ``||d||`` of the direction as given (weight units).
    """

    KIND = "directional_curvature"

    value: float
    method: Method
    operator: str
    unit_sums: np.ndarray
    unit_tokens: np.ndarray
    unit: str
    interval: Interval | None
    direction_norm: float
    step: float | None
    seconds: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_record(self) -> StoreRecord:
        """The per-unit sums with the JSON-able attributes, for a task of a curvature store."""
        return StoreRecord(arrays={"unit_sums": self.unit_sums, "unit_tokens": self.unit_tokens},
                           provenance={"kind": "directional_curvature", "value": self.value,
                                       "method": self.method, "operator": self.operator, "unit": self.unit,
                                       "interval": None if self.interval is None else self.interval.to_dict(),
                                       "direction_norm": self.direction_norm, "step": self.step,
                                       "seconds": self.seconds, **self.settings})

    @classmethod
    def from_record(cls, record: StoreRecord) -> DirectionalCurvature:
        """The estimate :meth:`to_record` wrote."""
        attrs, arrays = record.provenance, record.arrays
        fields = ("kind", "value", "method", "operator", "unit", "interval", "direction_norm", "step",
                  "seconds")
        interval = None if attrs["interval"] is None else Interval(**attrs["interval"])
        step = None if attrs["step"] is None else float(attrs["step"])
        return cls(float(attrs["value"]), attrs["method"], attrs["operator"], arrays["unit_sums"],
                   arrays["unit_tokens"], attrs["unit"], interval, float(attrs["direction_norm"]), step,
                   float(attrs["seconds"]), {k: v for k, v in attrs.items() if k not in fields})


    def __str__(self) -> str:
        body = (str(self.interval) if self.interval is not None
                else f"{self.value:.4g} ({len(self.unit_sums)} {self.unit})")
        return f"u^T {self.operator} u = {body} [{self.method}]"


@dataclass(frozen=True)
class PathCurvature(StoredTask):
    """Rayleigh quotient of a direction ``d`` at points ``w0 + t d`` of the straight path toward ``w0 + d``
    (e.g. ``d`` = a quantized model's displacement, ``t = 1`` its endpoint).

    Attributes:
        t: ``(P,)`` path coordinates; ``curvature``: ``(P,)`` ``u^T H(w0 + t d) u`` with ``u = d / ||d||``.
        low, high: ``(P,)`` interval bounds (NaN when no interval was requested).
        estimates: the full :class:`DirectionalCurvature` at each point (empty when read from a store, which
            keeps only the columns).
        slope, slope_low, slope_high: ``(P,)`` slope ``g(w0 + t d)^T u`` (nats/token per weight unit) and
            its interval, when asked for (``slope=True``); else ``None``. With the curvature at ``t = 0`` they
            give the quadratic model ``NLL(w0 + d) - NLL(w0) ~ ||d|| slope + ||d||^2 curvature / 2``.
    """

    KIND = "path_curvature"

    t: np.ndarray
    curvature: np.ndarray
    low: np.ndarray
    high: np.ndarray
    estimates: tuple[DirectionalCurvature, ...]
    direction_norm: float
    operator: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    slope: np.ndarray | None = None
    slope_low: np.ndarray | None = None
    slope_high: np.ndarray | None = None

    def to_record(self) -> StoreRecord:
        """``t``, ``curvature``, ``low``, ``high`` (and the slope's) with the JSON-able attributes, for a task
        of a curvature store."""
        arrays = {"t": self.t, "curvature": self.curvature, "low": self.low, "high": self.high}
        if self.slope is not None:
            arrays |= {"slope": self.slope, "slope_low": self.slope_low, "slope_high": self.slope_high}
        return StoreRecord(arrays=arrays,
                           provenance={"kind": "path_curvature", "direction_norm": self.direction_norm,
                                       "operator": self.operator, **self.settings})

    @classmethod
    def from_record(cls, record: StoreRecord) -> PathCurvature:
        """The columns :meth:`to_record` wrote (``estimates`` is empty: a store keeps no per-point units)."""
        attrs, arrays = record.provenance, record.arrays
        slope_names = ("slope", "slope_low", "slope_high")
        slope = tuple(arrays[name] for name in slope_names) if "slope" in arrays else (None,) * 3
        settings = {k: v for k, v in attrs.items() if k not in ("kind", "direction_norm", "operator")}
        return cls(arrays["t"], arrays["curvature"], arrays["low"], arrays["high"], (),
                   float(attrs["direction_norm"]), attrs["operator"], settings, *slope)



# ------------------------------------------------------------------------------------ measurements
class FlatDirection(NamedTuple):
    """A direction ``d`` made once for many measurements (:func:`flat_direction`): ``vector`` its flat
    ``(n,)`` form in the space's order, ``norm`` its ``||d||`` over the direction's layers (weight units)."""

    vector: torch.Tensor
    norm: float


def hvp_rayleigh_quotient(problem: NLLProblem, direction: Direction, level: float | None, n_resamples: int,
                          seed: int, flat: FlatDirection | None = None) -> DirectionalCurvature:
    """``d^T H d / d^T d`` at the current weights, one product per batch (the body of
    :meth:`landscape.curvature.Curvature.rayleigh_quotient`, which documents the arguments). ``flat``: the
    direction already made (:func:`flat_direction`), else made here."""
    model, kind = problem.model, problem.kind

    def product(batch: Batch, space: WeightSpace, d: torch.Tensor) -> float:
        batch_op = nll_operator(model, [batch], 1.0, space, kind)  # curvature of this batch's summed NLL
        with torch.enable_grad():  # d^T H d without the space-sized product H d where the operator can
            return quadratic_form(batch_op, d.to(batch_op.dtype))

    problem.check_model(needs_double_backward=True)
    return _over_batches(problem, direction, product, "hvp", (level, n_resamples, seed), flat)


def gradient_slope(problem: NLLProblem, direction: Direction, level: float | None, n_resamples: int,
                   seed: int, flat: FlatDirection | None = None) -> DirectionalCurvature:
    """``g^T u`` at the current weights, one backward pass per batch (the body of
    :meth:`landscape.curvature.Curvature.slope`); ``flat`` as in :func:`hvp_rayleigh_quotient`."""
    model = problem.model
    parameters = dict(model.named_parameters())

    def gradient(batch: Batch, space: WeightSpace, d: torch.Tensor) -> float:
        selected = [parameters[name] for name in space.parameter_names]  # the order of space.flatten
        with torch.enable_grad():
            grads = torch.autograd.grad(segment_nll_sums(model, *batch).sum(), selected)
        return float(torch.dot(torch.cat([g.reshape(-1) for g in grads]).to(d), d))

    problem.check_model(needs_double_backward=False)
    return _over_batches(problem, direction, gradient, "gradient", (level, n_resamples, seed), flat)


def flat_direction(model: nn.Module, space: WeightSpace,
                   tensors: Mapping[str, torch.Tensor]) -> FlatDirection:
    """``d`` as one flat ``(n,)`` vector of the space (the model's device; float32 for a bf16 / fp16 model, so
    every dot product is reduced in float32), made a layer at a time, with its norm."""
    like = next(model.parameters())
    return FlatDirection(space.flatten(tensors, like.new_empty(0, dtype=working_dtype(like.dtype))),
                         direction_norm(tensors, space.layers))


def _over_batches(problem: NLLProblem, direction: Direction,
                  measure: Callable[[Batch, WeightSpace, torch.Tensor], float],
                  method: Literal["hvp", "gradient"],
                  interval: tuple[float | None, int, int],
                  flat: FlatDirection | None) -> DirectionalCurvature:
    """Checks, then ``measure(batch, space, d)`` of each batch's summed NLL for the flat direction ``d``
    (``flat``, or :func:`flat_direction`), divided by ``||d||^2`` (``"hvp"``: ``u^T H u``, ``u = d / ||d||``)
    or ``||d||`` (``"gradient"``: ``g^T u``), combined by :func:`_directional` (the body of
    :func:`hvp_rayleigh_quotient` and :func:`gradient_slope`). Taking ``d`` itself, not a unit-vector copy
    of it, saves a space-sized vector (0.42 GB on SmolLM2's decoder weights). ``interval``: ``(level,
    n_resamples, seed)``."""
    model, batches = problem.model, problem.batches
    space = direction_space(model, direction)
    tensors = direction_tensors(direction)
    level, n_resamples, _ = interval
    check_interval_request(level, n_resamples, len(batches), "batches", problem.batch_size, problem.data)
    d, norm = flat_direction(model, space, tensors) if flat is None else flat  # (n,), ||d||
    scale = norm**2 if method == "hvp" else norm
    operator = "gradient" if method == "gradient" else problem.kind
    started = time.perf_counter()
    sums, tokens = [], []
    desc = "g^T u" if method == "gradient" else f"u^T {operator} u"
    for batch in tqdm(batches, desc=desc, disable=not problem.progress, leave=False):
        sums.append(measure(batch, space, d) / scale)
        tokens.append(int(batch[1][:, 1:].sum()))
    return _directional(problem, (sums, tokens, "batches"), (method, operator, norm, None), interval,
                        time.perf_counter() - started, {})


def finite_difference_curvature(problem: NLLProblem, direction: Direction, step: float | None,
                                extrapolate: bool, level: float | None, n_resamples: int,
                                seed: int) -> DirectionalCurvature:
    """``d2/dh2 NLL(w + h u)`` at ``h = 0`` from central differences of the NLL over every segment (the body
    of :meth:`landscape.curvature.Curvature.second_derivative`, which documents the arguments). The model is
    moved in place and restored bit-exactly."""
    model, batches = problem.model, problem.batches
    problem.check_model(needs_double_backward=False)
    space = direction_space(model, direction)
    tensors = direction_tensors(direction)
    like = next(model.parameters())
    if step is None:
        if like.dtype not in DEFAULT_FD_STEP:
            raise CurvatureError(f"no default finite-difference step for {like.dtype} weights (defaults "
                                 f"exist for {list(DEFAULT_FD_STEP)}): a {like.dtype} weight rounds w0 + h u "
                                 f"to 8 or 11 bits, which swamps any small step; use rayleigh_quotient (an "
                                 f"HVP) or load the model in float32, or pass step= explicitly")
        step = DEFAULT_FD_STEP[like.dtype]
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise CurvatureError(f"step must be a finite number > 0 (weight-norm units), got {step!r}")
    check_interval_request(level, n_resamples, problem.data.n_segments, "segments", None, problem.data)
    norm = direction_norm(tensors, space.layers)
    w0 = layer_weights(model, list(space.layers))  # layer -> (out, in)
    unit = {n: tensors[n].to(w0[n]) / norm for n in space.layers}  # layer -> (out, in), unit norm over all

    def segment_sums(offset: float) -> torch.Tensor:
        """Summed NLL of every segment at ``w0 + offset * u``: ``(n_segments,)`` float64."""
        with swapped_weights(model, {n: w0[n] + offset * unit[n] for n in space.layers}), torch.no_grad():
            return torch.cat([segment_nll_sums(model, *batch).double().cpu() for batch in batches])

    multiples = (-2, -1, 0, 1, 2) if extrapolate else (-1, 0, 1)
    started = time.perf_counter()
    nll_sums = {k: segment_sums(k * step) for k in tqdm(multiples, desc="finite difference",
                                                          disable=not problem.progress, leave=False)}

    def central(h_multiple: int) -> torch.Tensor:  # (n_segments,) D(k h) of each segment's summed NLL
        k = h_multiple
        return (nll_sums[k] - 2 * nll_sums[0] + nll_sums[-k]) / (k * step) ** 2

    curvature_sums = (4 * central(1) - central(2)) / 3 if extrapolate else central(1)  # (n_segments,)
    tokens = torch.cat([mask[:, 1:].sum(dim=1) for _, mask in batches]).numpy()  # (n_segments,)
    return _directional(problem, (curvature_sums.numpy(), tokens, "segments"),
                        ("finite-difference", "hessian", norm, float(step)), (level, n_resamples, seed),
                        time.perf_counter() - started, {"extrapolate": extrapolate})


def path_curvature(problem: NLLProblem, direction: Direction, t: Sequence[float], level: float | None,
                   n_resamples: int, seed: int, slope: bool) -> PathCurvature:
    """Curvature (and with ``slope`` the slope) along ``direction`` at ``w0 + t * direction`` (the body of
    :meth:`landscape.curvature.Curvature.along`, which documents the arguments). The model is moved in place
    (only the direction's layers) and restored to w0 bit-exactly after each point, also when an error
    interrupts."""
    model = problem.model
    problem.check_model(needs_double_backward=True)
    space = direction_space(model, direction)  # checked here, at w0
    # d as one flat vector, its layers views of it: the points and the products share one copy of d
    flat = flat_direction(model, space, direction_tensors(direction))
    tensors = space.views(flat.vector)
    points = np.asarray(t, dtype=np.float64)  # (P,)
    if points.ndim != 1 or len(points) == 0 or not np.all(np.isfinite(points)):
        raise CurvatureError(f"t must be a non-empty sequence of finite path coordinates, got {t!r}")
    check_interval_request(level, n_resamples, len(problem.batches), "batches", problem.batch_size,
                           problem.data)
    quiet = replace(problem, progress=False)  # one bar over the points, none per point
    estimates, slopes = [], []
    for point in tqdm(points, desc="curvature along path", disable=not problem.progress, leave=False):
        # w0 + t d formed a layer at a time as the swap installs it (the swap keeps w0 and restores it)
        with swapped_weights(model, _PathPoint(model, tensors, float(point))):
            estimates.append(hvp_rayleigh_quotient(quiet, tensors, level, n_resamples, seed, flat))
            if slope:
                slopes.append(gradient_slope(quiet, tensors, level, n_resamples, seed, flat))

    def columns(results: list[DirectionalCurvature]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(P,)`` values, interval lows and highs (NaN without an interval)."""
        nan = float("nan")
        return (np.array([e.value for e in results]),
                np.array([e.interval.low if e.interval else nan for e in results]),
                np.array([e.interval.high if e.interval else nan for e in results]))

    slope_columns = columns(slopes) if slope else (None, None, None)
    settings = {"level": level, "seed": seed, "slope": slope, **problem.provenance()}
    return PathCurvature(points, *columns(estimates), tuple(estimates), estimates[0].direction_norm,
                         problem.kind, settings, *slope_columns)


class _PathPoint(Mapping[str, torch.Tensor]):
    """``layer -> w0 + t d`` (``(out, in)``, the model's dtype), each formed from the model's current weight
    when it is read: read by :func:`~landscape.weights.swapped_weights` while the model is at w0, each layer's
    point is formed just before the swap installs it, so the point costs one copy of its layers (the ones
    installed), not a second one built beforehand."""

    def __init__(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], t: float) -> None:
        self.model, self.tensors, self.t = model, tensors, t

    def __getitem__(self, layer: str) -> torch.Tensor:
        w0 = weight_matrix(get_layer(self.model, layer)).detach()
        return w0 + self.t * self.tensors[layer].to(w0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _directional(problem: NLLProblem, units: tuple[Sequence[float], Sequence[int], str],
                 how: tuple[Method, str, float, float | None], interval: tuple[float | None, int, int],
                 seconds: float, extra: dict[str, Any]) -> DirectionalCurvature:
    """The estimate ``sum(unit_sums) / sum(unit_tokens)`` with its interval when asked for.

    Args:
        units: ``(unit_sums, unit_tokens, unit name)``.
        how: ``(method, operator, direction norm, finite-difference step or None)``.
        interval: ``(level or None, n_resamples, seed)``.
        extra: settings recorded before the problem's provenance.
    """
    sums, tokens, unit = units
    method, operator, norm, step = how
    level, n_resamples, seed = interval
    sums_array, tokens_array = np.asarray(sums, dtype=np.float64), np.asarray(tokens, dtype=np.int64)
    estimate_interval = None
    if level is not None:
        estimate_interval = token_mean_interval(sums_array, tokens_array, level=level,
                                                n_resamples=n_resamples, seed=seed, unit=unit)
    return DirectionalCurvature(float(sums_array.sum() / tokens_array.sum()), method, operator, sums_array,
                                tokens_array, unit, estimate_interval, norm, step, seconds,
                                {"level": level, "n_resamples": n_resamples, "seed": seed, **extra,
                                 **problem.provenance()})
