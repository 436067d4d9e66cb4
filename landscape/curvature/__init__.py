"""Curvature of the NLL around w0: Hessian (or Gauss-Newton) spectra, trace, density and directional curvature.

A thin layer over ``hessian-eigenthings`` 1.0.0a5 (its operators, Lanczos kernel, Hutch++ and SLQ), fixed to
the conventions of this toolkit:

* **Objective.** The token-mean NLL of :func:`landscape.objectives.nll`, ``L(w) = sum_s S_s(w) / N``
  (``S_s``: summed NLL of the scored tokens of segment ``s``, :func:`~landscape.objectives.segment_nll_sums`;
  ``N``: all scored tokens of the :class:`~landscape.data.TokenSet`). Every operator is exactly the Hessian
  ``H = d2L/dw2`` (``operator="hessian"``) or the generalized Gauss-Newton ``G = J^T H_logits J``
  (``operator="ggn"``, positive semi-definite) of that L; ``batch_size`` only bounds memory.
* **Coordinates.** The weights of the quantizable layers (:func:`landscape.models.quantizable_layers`), all
  of them, a glob subset (``"transformer.h.0.*"``) or one layer; the spectrum of a subset is that of the
  diagonal block of the full Hessian. Vectors come in and go out as ``layer name -> (out, in) tensor`` maps
  (:func:`landscape.models.weight_matrix` orientation; GPT-2's ``Conv1D`` stores ``(in, out)`` and is
  transposed for you), so eigenvectors are ready to use as scan directions.
* **Units.** Eigenvalues, traces and directional curvatures are in nats/token per squared weight unit:
  ``v^T H v`` for a unit vector ``v`` (Euclidean norm over all selected weights). A direction ``d`` is
  normalised first, so its curvature is the Rayleigh quotient ``d^T H d / d^T d``.
* **Measured pitfalls handled here** (FIELD_NOTES "Hessians"): Lanczos always reorthogonalises (ghost
  eigenvalues otherwise), runs about 50 steps, and reports both ends of the spectrum from one Krylov space
  (the top by largest *algebraic* value; the bottom is often negative away from a minimum); a Ritz pair
  whose residual is above tolerance is reported as not converged, with a :class:`ConvergenceWarning`.
  Double backward needs eager attention and eval mode; both are checked before any work.

* **Memory.** Reorthogonalised Lanczos keeps one full-length vector per step (SmolLM2-135M: 106M weights,
  0.42 GB per fp32 vector, 25 GB for 60 steps). A run whose vectors cannot fit in the memory available is
  refused before its first product, saying how many fit; ``krylov_dir`` keeps the basis in memory-mapped
  files instead (bit-identical results; the operating system pages it out).
* **First order too.** :func:`directional_slope` gives ``g^T u`` along a direction (one backward per batch), so
  a displacement's cost can be split into its first- and second-order parts
  (:func:`curvature_along_path` with ``slope=True``).

Cost: one Hessian-vector product (HVP) is a forward and a double backward over ``data``, measured at 3.0x a
forward+backward on ref-tiny (95 ms for 4 x 128 tokens, 1 CPU thread); a GGN product (a JVP plus a VJP) was
1.7x an HVP there. Lanczos adds full reorthogonalisation, negligible next to the products at 50 steps on a
small model. On SmolLM2 (2 x 128 tokens, 2 cores) a product took 8 s; 60 steps with the basis in mapped files
took 25 min, 8 of them products: once the basis outgrew the page cache, each step read it back from disk
(a step grew from 10 s to 67 s).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from hessian_eigenthings import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    LanczosTridiag,
    lanczos_tridiagonal,
    spectral_density,
    trace,
)
from hessian_eigenthings.linalg import SingleDeviceBackend
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.engine.directions import Direction as ToolkitDirection
from landscape.objectives import check_in_vocabulary, nll_sums_from_logits, segment_nll_sums
from landscape.stats import DEFAULT_RESAMPLES, Interval, normal_interval, token_mean_interval
from landscape.store import StoreRecord
from landscape.weights import (
    LayerSelection,
    layer_weights,
    quantizable_layers,
    select_layers,
    swapped_weights,
    weight_is_transposed,
    weight_matrix,
    weights_fingerprint,
)

OperatorKind = Literal["hessian", "ggn"]
OPERATORS: tuple[str, ...] = ("hessian", "ggn")
# A landscape.engine.directions.Direction, or any mapping layer name -> (out, in) tensor.
Direction = ToolkitDirection | Mapping[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens (b, t), score_mask (b, t))

DEFAULT_LANCZOS_STEPS = 50
DEFAULT_TOL = 1e-4
# Step h along the unit direction (weight-norm units) of the Richardson-extrapolated central second difference
# of the NLL, balancing O(h^4) truncation against about 6 eps L / h^2 roundoff (eps: machine epsilon, L ~ 5
# nats/token): about 1e-8 in float64 at 1e-3, about 2e-2 nats/token per unit^2 in float32 at 1e-2.
DEFAULT_FD_STEP: dict[torch.dtype, float] = {torch.float64: 1e-3, torch.float32: 1e-2}


class CurvatureError(ValueError):
    """A curvature request that cannot be served: bad layer selection, settings, model state or data."""


class DirectionMismatchError(CurvatureError):
    """A direction that does not belong to this model: unknown layer names or wrong shapes."""


class ConvergenceWarning(RuntimeWarning):
    """Some Lanczos Ritz pairs did not reach the residual tolerance (their ``converged`` flag is False)."""


# ------------------------------------------------------------------------------------- weight space
@dataclass(frozen=True)
class WeightSpace:
    """The flat vector space of some layers' weights, in the order the curvature operators use.

    A flat vector concatenates each layer's weight *parameter* flattened in its stored layout (GPT-2
    ``Conv1D``: ``(in, out)``), in ``model.named_parameters()`` order. :meth:`flatten` and :meth:`unflatten`
    convert from and to ``layer -> (out, in)`` maps.
    """

    layers: tuple[str, ...]
    parameter_names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (out, in) of each layer's weight
    transposed: tuple[bool, ...]  # True where the parameter is stored (in, out)

    @property
    def size(self) -> int:
        """Number of weights (the operator's dimension)."""
        return sum(o * i for o, i in self.shapes)

    def flatten(self, tensors: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """``layer -> (out, in)`` map (exactly these layers) to a flat vector with ``like``'s dtype and device."""
        parts = []
        for layer, transposed in zip(self.layers, self.transposed):
            t = tensors[layer].to(dtype=like.dtype, device=like.device)
            parts.append((t.T if transposed else t).reshape(-1))
        return torch.cat(parts)

    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``(size,)`` or stacked ``(k, size)`` vectors to ``layer -> (out, in)`` or ``(k, out, in)``."""
        lead = vectors.shape[:-1]
        out, offset = {}, 0
        for layer, (rows, cols), transposed in zip(self.layers, self.shapes, self.transposed):
            piece = vectors[..., offset : offset + rows * cols]
            offset += rows * cols
            out[layer] = (piece.reshape(*lead, cols, rows).transpose(-1, -2) if transposed
                          else piece.reshape(*lead, rows, cols)).contiguous()
        return out


def weight_space(model: nn.Module, layers: LayerSelection = None) -> WeightSpace:
    """The weights a curvature is taken over.

    Args:
        layers: ``None`` for every quantizable layer; a layer name or glob (``"transformer.h.0.*"``,
            ``"*.mlp.*"``); or a sequence of them. Each entry must match at least one quantizable layer.
    """
    available = quantizable_layers(model)
    chosen = select_layers(model, layers)
    param_names = {id(p): n for n, p in model.named_parameters()}
    order = {n: i for i, n in enumerate(param_names.values())}
    entries = []
    for layer in chosen:
        param = available[layer].weight
        matrix = weight_matrix(available[layer])
        if id(param) not in param_names:
            raise CurvatureError(f"the weight of layer {layer!r} is not a parameter of this model")
        if not param.requires_grad:
            raise CurvatureError(f"the weight of layer {layer!r} has requires_grad=False: curvature needs gradients "
                                 f"(call .requires_grad_(True) on it)")
        if not torch.isfinite(matrix).all():
            first = (~torch.isfinite(matrix)).nonzero()[0].tolist()
            raise CurvatureError(f"the weight of layer {layer!r} holds NaN or Inf (first at (out, in) index {first}): "
                                 f"the curvature at a non-finite w0 is undefined; weights must be finite")
        transposed = weight_is_transposed(available[layer])
        entries.append((order[param_names[id(param)]], layer, param_names[id(param)], tuple(matrix.shape), transposed))
    entries.sort()
    return WeightSpace(tuple(e[1] for e in entries), tuple(e[2] for e in entries), tuple(e[3] for e in entries),
                       tuple(e[4] for e in entries))


def direction_space(model: nn.Module, direction: Direction) -> WeightSpace:
    """Validate a direction against ``model`` and return the weight space of its layers.

    Args:
        direction: a :class:`landscape.engine.directions.Direction` or any mapping layer name -> ``(out, in)`` tensor
            over quantizable layers.

    Raises:
        DirectionMismatchError: unknown layer names, wrong shapes (e.g. a Conv1D ``(in, out)`` tensor or a
            direction from another model), non-finite values, an all-zero direction, or a Direction whose
            recorded base fingerprint is not this model's w0.
    """
    tensors = _direction_tensors(direction)
    available = list(quantizable_layers(model))
    unknown = [name for name in tensors if name not in available]
    if unknown:
        hint = ""
        if any(name.removesuffix(".weight") in available for name in unknown):
            hint = " (keys are layer names, without '.weight')"
        raise DirectionMismatchError(
            f"direction has {len(unknown)} layer(s) this model does not have, e.g. {unknown[:3]}{hint}; "
            f"a direction from another model? This model's quantizable layers are e.g. {available[:3]} "
            f"({len(available)} in all)")
    space = weight_space(model, [name for name in available if name in tensors])
    total = 0.0
    for layer, shape in zip(space.layers, space.shapes):
        tensor = tensors[layer]
        if not isinstance(tensor, torch.Tensor):
            raise DirectionMismatchError(f"direction[{layer!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            hint = (" (it looks transposed: directions use the (out, in) orientation of models.weight_matrix, "
                    "while GPT-2 Conv1D parameters are stored (in, out))" if tuple(tensor.shape) == shape[::-1] else
                    " (a direction from another model?)")
            raise DirectionMismatchError(f"direction[{layer!r}] has shape {tuple(tensor.shape)}, the layer's (out, in) "
                                         f"weight is {shape}{hint}")
        if not torch.isfinite(tensor).all():
            raise DirectionMismatchError(f"direction[{layer!r}] contains non-finite values")
        total += float(tensor.double().pow(2).sum())
    if total == 0.0:
        raise DirectionMismatchError("direction is zero everywhere: a curvature along it is undefined")
    recorded = getattr(getattr(direction, "spec", None), "base_fingerprint", "")
    if recorded and recorded != (actual := weights_fingerprint(model, list(space.layers))):
        raise DirectionMismatchError(f"direction was made on base weights with fingerprint {recorded}, but this "
                                     f"model's weights on its layers have fingerprint {actual}")
    return space


def _direction_tensors(direction: Direction) -> Mapping[str, torch.Tensor]:
    """The ``layer -> (out, in)`` tensors of a landscape.engine.directions.Direction (``.tensors``) or of a mapping."""
    tensors = getattr(direction, "tensors", direction)
    if not isinstance(tensors, Mapping) or not tensors:
        raise DirectionMismatchError(f"a direction is a landscape.engine.directions.Direction or a non-empty mapping "
                                     f"layer name -> (out, in) tensor, got {type(direction).__name__}")
    return tensors


# ---------------------------------------------------------------------------------------- operators
def curvature_operator(
    model: nn.Module,
    data: TokenSet,
    layers: LayerSelection = None,
    *,
    operator: OperatorKind = "hessian",
    batch_size: int = 8,
) -> CurvatureOperator:
    """The matrix-free Hessian (or GGN) of the token-mean NLL over ``data`` w.r.t. the selected weights.

    The returned ``hessian_eigenthings`` operator acts on flat vectors of :func:`weight_space` (same
    ``layers``); use it with the library's algorithms directly. Its products work under ``torch.no_grad``
    too, come back detached, and are counted in ``.n_matvecs`` (``.seconds`` spent). ``batch_size``
    segments per pass.
    """
    _check_problem(model, data, operator, batch_size)
    space = weight_space(model, layers)
    batches = _batches(data, batch_size)
    return _CountedOperator(_operator(model, batches, len(batches) / _scored_tokens(batches), space, operator))


def _operator(model: nn.Module, batches: list[Batch], loss_scale: float, space: WeightSpace,
              kind: OperatorKind) -> CurvatureOperator:
    """Operator of ``loss_scale * sum of NLL sums``, averaged over ``batches`` as hessian-eigenthings does.

    With ``loss_scale = len(batches) / N`` the average is the curvature of the token-mean NLL over all
    batches; with one batch and ``loss_scale = 1`` it is that of the batch's summed NLL.
    """
    selected = set(space.parameter_names)

    def in_space(name: str, _param: nn.Parameter) -> bool:
        return name in selected

    if kind == "hessian":
        def scaled_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
            return segment_nll_sums(model, *batch).sum() * loss_scale

        return HessianOperator(model, batches, scaled_nll, param_filter=in_space)

    def logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch[0]).logits  # (b, t, vocab)

    def scaled_nll_of_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return nll_sums_from_logits(logits, *batch).sum() * loss_scale

    return GGNOperator(model, batches, logits_of, scaled_nll_of_logits, param_filter=in_space)


class _CountedOperator(CurvatureOperator):
    """Wraps an operator: enables autograd, detaches, counts and times its products, advances a progress bar."""

    def __init__(self, inner: CurvatureOperator, bar: tqdm | None = None) -> None:
        self.inner, self.bar = inner, bar
        self.n_matvecs, self.seconds = 0, 0.0

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.enable_grad():
            out = self.inner.matvec(v).detach()  # GGN products come back attached to a graph
        self.seconds += time.perf_counter() - start
        self.n_matvecs += 1
        if self.bar is not None:
            self.bar.update(1)
        return out


# ------------------------------------------------------------------------------------------ spectrum
@dataclass(frozen=True)
class Eigenpairs:
    """Ritz pairs at one end of the spectrum.

    Attributes:
        end: ``"top"`` (largest algebraic eigenvalues, descending) or ``"bottom"`` (smallest, ascending).
        eigenvalues: ``(k,)`` nats/token per squared weight unit.
        residuals: ``(k,)`` Ritz residual norms ``||H v - lambda v||`` (same units); ``|lambda_true - lambda|``
            is at most this for the nearest true eigenvalue.
        converged: ``(k,)`` whether ``residual <= tol * |eigenvalue|`` (or at rounding level,
            ``10 eps max|eigenvalue|``, which matters for eigenvalues near 0).
        eigenvectors: layer -> ``(k, out, in)``; row ``i`` over all layers is a unit vector (sign arbitrary).
            ``None`` when not requested.
    """

    end: Literal["top", "bottom"]
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    eigenvectors: Mapping[str, torch.Tensor] | None

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def direction(self, i: int) -> dict[str, torch.Tensor]:
        """Eigenvector ``i`` as a unit-norm ``layer -> (out, in)`` direction (e.g. for a landscape scan)."""
        if self.eigenvectors is None:
            raise CurvatureError("eigenvectors were not kept (return_eigenvectors=False)")
        if not 0 <= i < len(self):
            raise IndexError(f"eigenpair index {i} out of range: {len(self)} {self.end} pairs")
        return {layer: vectors[i] for layer, vectors in self.eigenvectors.items()}


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenpairs of the NLL Hessian (or GGN) from one Lanczos run.

    Attributes:
        top, bottom: :class:`Eigenpairs` at each end (``bottom`` is empty when ``k_bottom=0``).
        operator: ``hessian`` or ``ggn``.
        layers: the layers whose weights span the space; ``n_params`` its dimension.
        lanczos_steps: Krylov dimension reached (= HVPs spent).
        seconds: wall time of the Lanczos run; ``seconds_per_matvec``: mean time of one product.
        settings: tolerance, seed, batch size, model and data provenance (JSON-able).
    """

    top: Eigenpairs
    bottom: Eigenpairs
    operator: str
    layers: tuple[str, ...]
    n_params: int
    lanczos_steps: int
    seconds: float
    seconds_per_matvec: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def eigenvalues(self) -> np.ndarray:
        """The top eigenvalues, descending."""
        return self.top.eigenvalues

    @property
    def converged(self) -> bool:
        """True only if every returned Ritz pair, top and bottom, converged."""
        return bool(self.top.converged.all() and self.bottom.converged.all())

    def to_record(self, include_eigenvectors: bool = True) -> StoreRecord:
        """The arrays and JSON-able attributes (its provenance) of a task of a curvature store.

        Array names: ``top/eigenvalues``, ``top/residuals``, ``top/converged``, ``top/eigenvectors/<layer>``
        (``(k, out, in)``), and the same under ``bottom/``.
        """
        arrays: dict[str, np.ndarray] = {}
        for pairs in (self.top, self.bottom):
            arrays[f"{pairs.end}/eigenvalues"] = pairs.eigenvalues
            arrays[f"{pairs.end}/residuals"] = pairs.residuals
            arrays[f"{pairs.end}/converged"] = pairs.converged
            if include_eigenvectors and pairs.eigenvectors is not None:
                for layer, vectors in pairs.eigenvectors.items():
                    arrays[f"{pairs.end}/eigenvectors/{layer}"] = vectors.detach().cpu().numpy()
        attrs = {"kind": "spectrum", "operator": self.operator, "layers": list(self.layers), "n_params": self.n_params,
                 "lanczos_steps": self.lanczos_steps, "seconds": self.seconds,
                 "seconds_per_matvec": self.seconds_per_matvec, "converged": self.converged, **self.settings}
        return StoreRecord(attrs, arrays=arrays)

    def __str__(self) -> str:
        flag = "" if self.converged else " (NOT all converged)"
        return (f"{self.operator} spectrum over {self.n_params:,} weights ({len(self.layers)} layers), "
                f"{self.lanczos_steps} Lanczos steps{flag}: top {np.array2string(self.top.eigenvalues, precision=4)}, "
                f"bottom {np.array2string(self.bottom.eigenvalues, precision=4)}")


def hessian_spectrum(
    model: nn.Module,
    data: TokenSet,
    *,
    k: int = 10,
    k_bottom: int = 3,
    layers: LayerSelection = None,
    operator: OperatorKind = "hessian",
    lanczos_steps: int | None = None,
    tol: float = DEFAULT_TOL,
    batch_size: int = 8,
    seed: int = 0,
    return_eigenvectors: bool = True,
    krylov_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Spectrum:
    """Top-``k`` and bottom-``k_bottom`` eigenpairs of the NLL Hessian (or GGN) by reorthogonalised Lanczos.

    One Lanczos run (``lanczos_steps`` HVPs from a seeded Gaussian start vector) builds a Krylov space;
    the Ritz pairs at its upper end approximate the largest *algebraic* eigenvalues (``which="LA"``), those
    at its lower end the smallest (``"SA"``), which near a pretrained w0 are often negative.

    Args:
        k, k_bottom: eigenpairs wanted at the top and at the bottom (``k_bottom=0`` for none).
        layers: weights to take the curvature over (see :func:`weight_space`); a subset gives the spectrum
            of the corresponding diagonal block of the full Hessian.
        operator: ``"hessian"`` or ``"ggn"`` (generalized Gauss-Newton, PSD).
        lanczos_steps: Krylov dimension; default ``max(50, 2 * (k + k_bottom))`` capped at the dimension.
        tol: a pair is converged when its residual is at most ``tol * |eigenvalue|`` (or at rounding level).
        batch_size: segments per forward pass (memory only).
        seed: seed of the start vector.
        return_eigenvectors: keep the eigenvectors (``k + k_bottom`` vectors of every selected weight).
        krylov_dir: ``None`` keeps the Krylov basis (one full-length vector per step) in memory; a directory keeps
            it in memory-mapped files there instead (CPU only; removed when the run ends), so the operating system
            can page it out: 60 steps on a 135M-parameter model need 25 GiB, more than a 24 GiB machine has.
            The numbers are bit-identical either way.

    Returns:
        A :class:`Spectrum`; a :class:`ConvergenceWarning` is issued if any pair did not converge.
    """
    _check_problem(model, data, operator, batch_size)
    space = weight_space(model, layers)
    if not isinstance(k, int) or k < 1:
        raise CurvatureError(f"k (top eigenpairs) must be an integer >= 1, got {k!r}")
    if not isinstance(k_bottom, int) or k_bottom < 0:
        raise CurvatureError(f"k_bottom must be an integer >= 0, got {k_bottom!r}")
    steps = min(max(DEFAULT_LANCZOS_STEPS, 2 * (k + k_bottom)), space.size) if lanczos_steps is None else lanczos_steps
    if not isinstance(steps, int) or not k + k_bottom <= steps <= space.size:
        raise CurvatureError(f"lanczos_steps must be an integer in [k + k_bottom, n_params] = [{k + k_bottom}, "
                             f"{space.size}], got {steps!r}")
    if not tol > 0:
        raise CurvatureError(f"tol must be > 0, got {tol!r}")
    # Lanczos keeps its whole basis (one vector per step; on disk with krylov_dir), plus the Ritz vectors if returned.
    returned = k + k_bottom if return_eigenvectors else 0
    _check_krylov_memory(model, space, steps + 1, returned, f"lanczos_steps={steps}", "lanczos_steps", krylov_dir)
    batches = _batches(data, batch_size)
    op = _operator(model, batches, len(batches) / _scored_tokens(batches), space, operator)

    generator = torch.Generator().manual_seed(seed)
    start_vector = torch.randn(space.size, generator=generator, dtype=op.dtype).to(op.device)
    started = time.perf_counter()
    with (_krylov_backend(krylov_dir) as backend,  # a disk basis lives until the Ritz vectors are formed
          tqdm(total=steps, desc=f"Lanczos ({operator})", disable=not progress, leave=False) as bar):
        counted = _CountedOperator(op, bar)
        krylov = lanczos_tridiagonal(counted, start_vector, steps, reorthogonalize=True, backend=backend)
        seconds = time.perf_counter() - started
        spectrum = _ritz_spectrum(krylov, space, op, k, k_bottom, tol, return_eigenvectors, operator, seconds,
                                  counted, {"tol": tol, "seed": seed, "k": k, "k_bottom": k_bottom,
                                            "reorthogonalize": True, "krylov_storage": "disk" if krylov_dir else
                                            "memory", **_provenance(model, data, batch_size)})
    if not spectrum.converged:
        top, bottom = spectrum.top, spectrum.bottom
        bad = [f"{p.end} {v:.4g} (residual {r:.2g})" for p in (top, bottom)
               for v, r, ok in zip(p.eigenvalues, p.residuals, p.converged) if not ok]
        warnings.warn(f"{len(bad)} of {len(top) + len(bottom)} Ritz pairs not converged after {krylov.iterations} "
                      f"Lanczos steps at tol={tol:g}: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                      f"raise lanczos_steps", ConvergenceWarning, stacklevel=2)
    return spectrum


def _ritz_spectrum(krylov: LanczosTridiag, space: WeightSpace, op: CurvatureOperator, k: int, k_bottom: int,
                   tol: float, return_eigenvectors: bool, operator: str, seconds: float, counted: _CountedOperator,
                   settings: dict[str, Any]) -> Spectrum:
    """The top-``k`` and bottom-``k_bottom`` Ritz pairs of a Lanczos run, with residuals and convergence flags."""
    ritz_values, ritz_coords = torch.linalg.eigh(_tridiagonal(krylov))  # ascending; columns = Ritz coordinates
    residuals = ritz_coords[-1].abs() * krylov.last_beta  # ||H y - theta y|| of each Ritz pair
    # A residual at rounding level of the spectrum's scale is converged even for an eigenvalue near 0.
    roundoff = 10 * torch.finfo(ritz_values.dtype).eps * float(ritz_values.abs().max())
    m = len(ritz_values)
    top_index = list(range(m - 1, max(m - 1 - k, -1), -1))
    bottom_index = [i for i in range(min(k_bottom, m)) if i not in top_index]
    if len(top_index) < k or len(bottom_index) < k_bottom:
        warnings.warn(f"the Krylov space closed after {m} steps (an invariant subspace): only {m} Ritz pairs exist, "
                      f"fewer than k + k_bottom = {k + k_bottom}; returning {len(top_index)} top and "
                      f"{len(bottom_index)} bottom pairs", ConvergenceWarning, stacklevel=3)

    def pairs(end: Literal["top", "bottom"], index: list[int]) -> Eigenpairs:
        idx = torch.tensor(index, dtype=torch.long, device=ritz_values.device)
        values, res = ritz_values[idx], residuals[idx]
        vectors = None
        if return_eigenvectors:
            stacked = torch.zeros(len(index), space.size, dtype=op.dtype, device=op.device)  # (k, n)
            for j, basis_vector in enumerate(krylov.basis):  # Ritz vector = Krylov basis @ Ritz coordinates
                stacked.addr_(ritz_coords[j, idx], basis_vector)
            vectors = space.unflatten(stacked)
        converged = (res <= tol * values.abs()) | (res <= roundoff)
        return Eigenpairs(end, _numpy(values), _numpy(res), _numpy(converged), vectors)

    top, bottom = pairs("top", top_index), pairs("bottom", bottom_index)
    return Spectrum(top, bottom, operator, space.layers, space.size, krylov.iterations, seconds,
                    counted.seconds / max(counted.n_matvecs, 1), settings)


def _tridiagonal(krylov: LanczosTridiag) -> torch.Tensor:
    """The Lanczos tridiagonal matrix ``T = Q^T H Q`` (m x m) from its diagonal and off-diagonal."""
    m = krylov.alphas.shape[0]
    off = krylov.betas[: m - 1]
    return torch.diag(krylov.alphas) + torch.diag(off, 1) + torch.diag(off, -1)


# --------------------------------------------------------------------------------------------- trace
@dataclass(frozen=True)
class TraceEstimate:
    """Hutch++ estimate of ``tr(H)`` (nats/token per squared weight unit).

    ``stderr`` is the standard error of the stochastic (residual Hutchinson) part; the sketched part is
    exact. ``n_matvecs`` products were spent; ``value / n_params`` is the mean eigenvalue.
    """

    value: float
    stderr: float
    n_matvecs: int
    operator: str
    layers: tuple[str, ...]
    n_params: int
    seconds: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean_eigenvalue(self) -> float:
        return self.value / self.n_params

    def interval(self, level: float = 0.95) -> Interval:
        """Normal interval ``value +- z * stderr`` over the residual probe vectors."""
        return normal_interval(self.value, self.stderr, level=level, n_units=self.n_matvecs // 3,
                               unit="probe vectors")

    def to_record(self) -> StoreRecord:
        """The JSON-able attributes of a task of a curvature store (all fields are scalars)."""
        return StoreRecord({"kind": "trace", "value": self.value, "stderr": self.stderr, "n_matvecs": self.n_matvecs,
                            "operator": self.operator, "layers": list(self.layers), "n_params": self.n_params,
                            "seconds": self.seconds, **self.settings})

    def __str__(self) -> str:
        return (f"tr({self.operator}) = {self.value:.5g} +- {self.stderr:.2g} (Hutch++, {self.n_matvecs} products, "
                f"{self.n_params:,} weights)")


def hessian_trace(
    model: nn.Module,
    data: TokenSet,
    *,
    layers: LayerSelection = None,
    operator: OperatorKind = "hessian",
    n_matvecs: int = 30,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> TraceEstimate:
    """Trace of the NLL Hessian (or GGN) by Hutch++ (Meyer et al. 2021): a third of the products sketch the
    top subspace (its trace is exact), the rest estimate the remainder with Rademacher probes.

    Args:
        n_matvecs: product budget, >= 6 (rounded down to a multiple of 3; Hutch++ needs two residual probes
            to state an error).
    """
    _check_problem(model, data, operator, batch_size)
    space = weight_space(model, layers)
    if not isinstance(n_matvecs, int) or n_matvecs < 6:
        raise CurvatureError(f"n_matvecs must be an integer >= 6 (Hutch++ spends a third on residual probes, and "
                             f"needs >= 2 of them for an error estimate), got {n_matvecs!r}")
    budget = 3 * (n_matvecs // 3)
    # the sketch H S (n x budget/3), its QR factor Q and LAPACK's copy are in memory together
    _check_krylov_memory(model, space, 0, budget, f"n_matvecs={n_matvecs}", "n_matvecs", None)
    batches = _batches(data, batch_size)
    op = _operator(model, batches, len(batches) / _scored_tokens(batches), space, operator)
    started = time.perf_counter()
    with tqdm(total=budget, desc=f"Hutch++ ({operator})", disable=not progress, leave=False) as bar:
        counted = _CountedOperator(op, bar)
        result = trace(counted, num_matvecs=budget, method="hutch++", seed=seed)
    return TraceEstimate(result.estimate, result.stderr, counted.n_matvecs, operator, space.layers, space.size,
                         time.perf_counter() - started,
                         {"method": "hutch++", "seed": seed, **_provenance(model, data, batch_size)})


# ------------------------------------------------------------------------------------------- density
@dataclass(frozen=True)
class Density:
    """Eigenvalue density of the NLL Hessian (or GGN) by stochastic Lanczos quadrature.

    Attributes:
        grid: ``(G,)`` eigenvalues (nats/token per squared weight unit).
        density: ``(G,)`` probability density of an eigenvalue drawn uniformly from the ``n_params``
            eigenvalues; it integrates to 1 (multiply by ``n_params`` for eigenvalues per unit).
        sigma: width of the Gaussian kernel that smooths the quadrature nodes.
        nodes, weights: ``(n_runs, m)`` quadrature nodes (Ritz values) and weights of each run (rows sum to 1).
    """

    grid: np.ndarray
    density: np.ndarray
    sigma: float
    nodes: np.ndarray
    weights: np.ndarray
    operator: str
    layers: tuple[str, ...]
    n_params: int
    n_matvecs: int
    seconds: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_record(self) -> StoreRecord:
        """Grid, density, nodes and weights with the JSON-able attributes, for a task of a curvature store."""
        return StoreRecord(arrays={"grid": self.grid, "density": self.density, "nodes": self.nodes,
                                   "weights": self.weights},
                           provenance={"kind": "density", "sigma": self.sigma, "operator": self.operator,
                                       "layers": list(self.layers), "n_params": self.n_params,
                                       "n_matvecs": self.n_matvecs, "seconds": self.seconds, **self.settings})


def hessian_density(
    model: nn.Module,
    data: TokenSet,
    *,
    layers: LayerSelection = None,
    operator: OperatorKind = "hessian",
    n_runs: int = 5,
    lanczos_steps: int = 50,
    n_grid: int = 2000,
    sigma: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    krylov_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Density:
    """Smoothed eigenvalue density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

    ``n_runs`` reorthogonalised Lanczos runs of ``lanczos_steps`` products from Rademacher start vectors
    (seeds ``seed``, ``seed + 1``...); ``sigma`` defaults to the node range / ``lanczos_steps``; ``krylov_dir``
    as in :func:`hessian_spectrum`.
    """
    _check_problem(model, data, operator, batch_size)
    space = weight_space(model, layers)
    if not isinstance(n_runs, int) or n_runs < 1:
        raise CurvatureError(f"n_runs must be an integer >= 1, got {n_runs!r}")
    if not isinstance(lanczos_steps, int) or not 1 <= lanczos_steps <= space.size:
        raise CurvatureError(f"lanczos_steps must be an integer in [1, n_params={space.size}], got {lanczos_steps!r}")
    if not isinstance(n_grid, int) or n_grid < 2:
        raise CurvatureError(f"n_grid must be an integer >= 2, got {n_grid!r}")
    if sigma is not None and not sigma > 0:
        raise CurvatureError(f"sigma must be > 0 or None (automatic), got {sigma!r}")
    _check_krylov_memory(model, space, lanczos_steps + 1, 0, f"lanczos_steps={lanczos_steps}", "lanczos_steps",
                         krylov_dir)
    batches = _batches(data, batch_size)
    op = _operator(model, batches, len(batches) / _scored_tokens(batches), space, operator)
    started = time.perf_counter()
    with (_krylov_backend(krylov_dir) as backend,
          tqdm(total=n_runs * lanczos_steps, desc=f"SLQ ({operator})", disable=not progress, leave=False) as bar):
        counted = _CountedOperator(op, bar)
        result = spectral_density(counted, num_runs=n_runs, lanczos_steps=lanczos_steps, num_grid_points=n_grid,
                                  sigma=sigma, seed=seed, backend=backend)
    return Density(_numpy(result.grid), _numpy(result.density), float(result.sigma), _numpy(result.raw_eigenvalues),
                   _numpy(result.raw_weights), operator, space.layers, space.size, counted.n_matvecs,
                   time.perf_counter() - started,
                   {"n_runs": n_runs, "lanczos_steps": lanczos_steps, "seed": seed,
                    **_provenance(model, data, batch_size)})


# ------------------------------------------------------------------------------ directional curvature
@dataclass(frozen=True)
class DirectionalCurvature:
    """Curvature of the NLL along a unit direction ``u = d / ||d||``: ``u^T H u`` (nats/token per squared
    weight unit), from Hessian-vector products or from a finite difference of the NLL.

    The estimate is a ratio of sums over independent units (batches of segments for ``hvp``, single
    segments for ``finite-difference``): ``value = sum(unit_sums) / sum(unit_tokens)``, where
    ``unit_sums[i]`` is ``u^T H_i u`` for the *summed* NLL of unit ``i``. That makes the same bootstrap as
    for an NLL apply (:func:`landscape.stats.token_mean_interval`).

    Attributes:
        method: ``hvp`` (Rayleigh quotient from exact products) or ``finite-difference``
            (``(L(w+h u) - 2 L(w) + L(w-h u)) / h^2`` with ``h = step``); ``gradient`` marks the *first*
            directional derivative ``g^T u`` of :func:`directional_slope` (same units per weight unit, not squared).
        operator: ``hessian`` or ``ggn`` (``hvp`` only).
        interval: bootstrap interval over the units, or ``None`` when not requested.
        direction_norm: ``||d||`` of the direction as given (weight units).
    """

    value: float
    method: Literal["hvp", "finite-difference", "gradient"]
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

    def __str__(self) -> str:
        body = (str(self.interval) if self.interval is not None
                else f"{self.value:.4g} ({len(self.unit_sums)} {self.unit})")
        return f"u^T {self.operator} u = {body} [{self.method}]"


def rayleigh_quotient(
    model: nn.Module,
    data: TokenSet,
    direction: Direction,
    *,
    operator: OperatorKind = "hessian",
    batch_size: int = 8,
    level: float | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> DirectionalCurvature:
    """Rayleigh quotient ``d^T H d / d^T d`` of the NLL Hessian (or GGN) along ``direction`` at the current weights.

    One product per batch of ``batch_size`` segments. With ``level`` (e.g. 0.95) the per-batch values give
    a bootstrap interval over batches (needs >= 2 batches): on a single small batch the curvature ranking
    of two directions can flip, so compare with intervals.

    Args:
        direction: a :class:`landscape.engine.directions.Direction` or a mapping layer name -> ``(out, in)`` tensor,
            over any subset of the quantizable layers (the curvature is then that of that block of H).
    """
    def product(batch: Batch, space: WeightSpace, unit_vector: torch.Tensor) -> float:
        batch_op = _operator(model, [batch], 1.0, space, operator)  # curvature of this batch's summed NLL
        with torch.enable_grad():
            return float(torch.dot(unit_vector, batch_op.matvec(unit_vector).detach()))

    return _over_batches(model, data, direction, product, "hvp", operator, batch_size, level, n_resamples, seed,
                         progress)


def directional_slope(
    model: nn.Module,
    data: TokenSet,
    direction: Direction,
    *,
    batch_size: int = 8,
    level: float | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> DirectionalCurvature:
    """Slope ``g^T u`` of the token-mean NLL along ``u = d / ||d||`` at the current weights (nats/token per weight
    unit): the first-order term of ``NLL(w + h u) = NLL(w) + h g^T u + h^2 u^T H u / 2 + ...``.

    One backward pass per batch of ``batch_size`` segments (no double backward: any attention); with ``level``
    a bootstrap interval over batches. Returned as a :class:`DirectionalCurvature` with ``method="gradient"``
    (``unit_sums[i]``: the slope of batch ``i``'s summed NLL). Arguments as in :func:`rayleigh_quotient`.
    """
    parameters = dict(model.named_parameters())

    def gradient(batch: Batch, space: WeightSpace, unit_vector: torch.Tensor) -> float:
        selected = [parameters[name] for name in space.parameter_names]  # the order of space.flatten
        with torch.enable_grad():
            grads = torch.autograd.grad(segment_nll_sums(model, *batch).sum(), selected)
        return float(torch.dot(torch.cat([g.reshape(-1) for g in grads]), unit_vector))

    return _over_batches(model, data, direction, gradient, "gradient", "gradient", batch_size, level, n_resamples,
                         seed, progress)


def _over_batches(model: nn.Module, data: TokenSet, direction: Direction,
                  measure: Callable[[Batch, WeightSpace, torch.Tensor], float],
                  method: Literal["hvp", "gradient"], operator: str, batch_size: int, level: float | None,
                  n_resamples: int, seed: int, progress: bool) -> DirectionalCurvature:
    """Checks, the unit vector ``u = d / ||d||`` (flat, model dtype and device), and ``measure(batch, space, u)``
    of each batch's summed NLL, combined by :func:`_directional` (the body of :func:`rayleigh_quotient` and
    :func:`directional_slope`)."""
    _check_problem(model, data, "hessian" if method == "gradient" else operator, batch_size,
                   needs_double_backward=method == "hvp")
    space = direction_space(model, direction)
    tensors = _direction_tensors(direction)
    batches = _batches(data, batch_size)
    _check_interval_request(level, n_resamples, len(batches), "batches", batch_size, data)
    norm = _norm(tensors, space.layers)
    unit_vector = space.flatten(tensors, next(model.parameters())) / norm
    started = time.perf_counter()
    sums, tokens = [], []
    desc = "g^T u" if method == "gradient" else f"u^T {operator} u"
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        sums.append(measure(batch, space, unit_vector))
        tokens.append(int(batch[1][:, 1:].sum()))
    return _directional(sums, tokens, "batches", method, operator, norm, None, level, n_resamples, seed,
                        time.perf_counter() - started, _provenance(model, data, batch_size))


def second_directional_derivative(
    model: nn.Module,
    data: TokenSet,
    direction: Direction,
    *,
    step: float | None = None,
    extrapolate: bool = True,
    batch_size: int = 8,
    level: float | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> DirectionalCurvature:
    """``d2/dh2 NLL(w + h u)`` at ``h = 0`` (``u = d / ||d||``) from central finite differences of the NLL.

    The central difference ``D(h) = (L(w + h u) - 2 L(w) + L(w - h u)) / h^2`` has an ``O(h^2)`` error; with
    ``extrapolate`` (default) Richardson's ``(4 D(h) - D(2h)) / 3`` removes it, leaving ``O(h^4)`` plus a
    roundoff of about ``6 eps L / h^2`` (eps: machine epsilon, L ~ 5 nats/token). Along the sharpest
    direction of ref-tiny (lambda = 100) plain ``D`` was 9 % off at h = 1e-2: the NLL is far from quadratic
    there. It needs only forward passes (no double backward; any attention), 5 NLL evaluations (3 without
    ``extrapolate``). The model is moved in place and restored bit-exactly. With ``level``, a bootstrap
    interval over segments.

    Args:
        step: ``h`` in weight-norm units; default :data:`DEFAULT_FD_STEP` (``1e-3`` in float64: roundoff
            about 1e-8; ``1e-2`` in float32: roundoff about 2e-2 nats/token per unit^2, so compute small
            curvatures in float64).
    """
    _check_problem(model, data, "hessian", batch_size, needs_double_backward=False)
    space = direction_space(model, direction)
    tensors = _direction_tensors(direction)
    like = next(model.parameters())
    if step is None:
        if like.dtype not in DEFAULT_FD_STEP:
            raise CurvatureError(f"no default finite-difference step for {like.dtype}: pass step= explicitly "
                                 f"(defaults exist for {list(DEFAULT_FD_STEP)})")
        step = DEFAULT_FD_STEP[like.dtype]
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise CurvatureError(f"step must be a finite number > 0 (weight-norm units), got {step!r}")
    batches = _batches(data, batch_size)
    _check_interval_request(level, n_resamples, data.n_segments, "segments", None, data)
    norm = _norm(tensors, space.layers)
    w0 = layer_weights(model, list(space.layers))
    unit = {n: tensors[n].to(w0[n]) / norm for n in space.layers}

    def segment_sums(offset: float) -> torch.Tensor:
        """Summed NLL of every segment at ``w0 + offset * u``: ``(n_segments,)`` float64."""
        with swapped_weights(model, {n: w0[n] + offset * unit[n] for n in space.layers}), torch.no_grad():
            return torch.cat([segment_nll_sums(model, *batch).double().cpu() for batch in batches])

    multiples = (-2, -1, 0, 1, 2) if extrapolate else (-1, 0, 1)
    started = time.perf_counter()
    nll_sums = {k: segment_sums(k * step) for k in tqdm(multiples, desc="finite difference", disable=not progress,
                                                          leave=False)}

    def central(h_multiple: int) -> torch.Tensor:  # per-segment D(k h) of the summed NLL
        k = h_multiple
        return (nll_sums[k] - 2 * nll_sums[0] + nll_sums[-k]) / (k * step) ** 2

    curvature_sums = (4 * central(1) - central(2)) / 3 if extrapolate else central(1)
    tokens = torch.cat([mask[:, 1:].sum(dim=1) for _, mask in batches]).numpy()
    return _directional(curvature_sums.numpy(), tokens, "segments", "finite-difference", "hessian", norm,
                        float(step), level, n_resamples, seed, time.perf_counter() - started,
                        {"extrapolate": extrapolate, **_provenance(model, data, batch_size)})


@dataclass(frozen=True)
class PathCurvature:
    """Rayleigh quotient of a direction ``d`` at points ``w0 + t d`` of the straight path toward ``w0 + d``
    (e.g. ``d`` = a quantized model's displacement, ``t = 1`` its endpoint).

    Attributes:
        t: ``(P,)`` path coordinates; ``curvature``: ``(P,)`` ``u^T H(w0 + t d) u`` with ``u = d / ||d||``.
        low, high: ``(P,)`` interval bounds (NaN when no interval was requested).
        estimates: the full :class:`DirectionalCurvature` at each point.
        slope, slope_low, slope_high: ``(P,)`` slope ``g(w0 + t d)^T u`` (nats/token per weight unit) and its
            interval, when asked for (``slope=True``); else ``None``. With the curvature at ``t = 0`` they give
            the quadratic model ``NLL(w0 + d) - NLL(w0) ~ ||d|| slope + ||d||^2 curvature / 2``.
    """

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
        """``t``, ``curvature``, ``low``, ``high`` (and the slope's) with the JSON-able attributes, for a task of a
        curvature store."""
        arrays = {"t": self.t, "curvature": self.curvature, "low": self.low, "high": self.high}
        if self.slope is not None:
            arrays |= {"slope": self.slope, "slope_low": self.slope_low, "slope_high": self.slope_high}
        return StoreRecord(arrays=arrays,
                           provenance={"kind": "path_curvature", "direction_norm": self.direction_norm,
                                       "operator": self.operator, **self.settings})


def curvature_along_path(
    model: nn.Module,
    data: TokenSet,
    direction: Direction,
    t: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    operator: OperatorKind = "hessian",
    batch_size: int = 8,
    level: float | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    slope: bool = False,
    progress: bool = True,
) -> PathCurvature:
    """Curvature along ``direction`` at several points ``w0 + t * direction`` of the path from w0 (and, with
    ``slope``, the slope :func:`directional_slope` there too: one backward pass more per batch and point).

    At w0 itself a quantization displacement looks as flat as a random direction; differences in steepness
    between methods show along the path. The model is moved in place (only the direction's layers; no
    copy of the model) and restored to w0 bit-exactly after each point, also when an error interrupts.
    Other arguments as in :func:`rayleigh_quotient`.
    """
    _check_problem(model, data, operator, batch_size)
    space = direction_space(model, direction)
    tensors = {n: _direction_tensors(direction)[n] for n in space.layers}  # checked here, at w0
    points = np.asarray(t, dtype=np.float64)
    if points.ndim != 1 or len(points) == 0 or not np.all(np.isfinite(points)):
        raise CurvatureError(f"t must be a non-empty sequence of finite path coordinates, got {t!r}")
    _check_interval_request(level, n_resamples, len(_batches(data, batch_size)), "batches", batch_size, data)
    w0 = layer_weights(model, list(space.layers))
    estimates, slopes = [], []
    interval_args = {"batch_size": batch_size, "level": level, "n_resamples": n_resamples, "seed": seed,
                     "progress": False}
    for point in tqdm(points, desc="curvature along path", disable=not progress, leave=False):
        moved = {n: w0[n] + float(point) * tensors[n].to(w0[n]) for n in space.layers}
        with swapped_weights(model, moved):
            estimates.append(rayleigh_quotient(model, data, tensors, operator=operator, **interval_args))
            if slope:
                slopes.append(directional_slope(model, data, tensors, **interval_args))

    def columns(results: list[DirectionalCurvature]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nan = float("nan")
        return (np.array([e.value for e in results]),
                np.array([e.interval.low if e.interval else nan for e in results]),
                np.array([e.interval.high if e.interval else nan for e in results]))

    slope_columns = columns(slopes) if slope else (None, None, None)
    return PathCurvature(points, *columns(estimates), tuple(estimates), estimates[0].direction_norm, operator,
                         {"level": level, "seed": seed, "slope": slope, **_provenance(model, data, batch_size)},
                         *slope_columns)


def _directional(sums: Sequence[float], tokens: Sequence[int], unit: str,
                 method: Literal["hvp", "finite-difference", "gradient"],
                 operator: str, norm: float, step: float | None, level: float | None, n_resamples: int, seed: int,
                 seconds: float, provenance: dict[str, Any]) -> DirectionalCurvature:
    sums_array, tokens_array = np.asarray(sums, dtype=np.float64), np.asarray(tokens, dtype=np.int64)
    interval = None
    if level is not None:
        interval = token_mean_interval(sums_array, tokens_array, level=level, n_resamples=n_resamples, seed=seed,
                                       unit=unit)
    return DirectionalCurvature(float(sums_array.sum() / tokens_array.sum()), method, operator, sums_array,
                                tokens_array, unit, interval, norm, step, seconds,
                                {"level": level, "n_resamples": n_resamples, "seed": seed, **provenance})


# ----------------------------------------------------------------------------------------- internals
KRYLOV_MEMORY_SHARE = 0.8  # of the memory available when a Lanczos run starts; the rest is the HVPs' workspace


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can use now: free GPU memory, or Linux's ``MemAvailable`` (which counts
    reclaimable page cache); ``None`` where it cannot be known (the check is then skipped)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_krylov_memory(model: nn.Module, space: WeightSpace, n_basis: int, n_returned: int, request: str,
                         knob: str, krylov_dir: str | os.PathLike | None) -> None:
    """Refuse, before any product, a Lanczos run whose vectors cannot fit: ``n_basis`` Krylov vectors (in memory,
    or in files under ``krylov_dir``, which must then have the disk space) and ``n_returned`` Ritz vectors (in
    memory). A 135M-parameter model needs 0.42 GB per fp32 vector: 60 steps are 25 GB."""
    parameter = next(model.parameters())
    per_vector = space.size * parameter.element_size()
    if krylov_dir is not None:
        if parameter.device.type != "cpu":
            raise CurvatureError(f"krylov_dir keeps the Krylov basis in memory-mapped files, which needs the model "
                                 f"on the CPU; it is on {parameter.device}: pass krylov_dir=None")
        directory = Path(krylov_dir)
        if not directory.is_dir():
            raise CurvatureError(f"krylov_dir {str(directory)!r} is not an existing directory")
        free = shutil.disk_usage(directory).free
        if n_basis * per_vector > free:
            raise CurvatureError(
                f"{request} keeps {n_basis} Krylov vectors of {space.size:,} weights "
                f"({n_basis * per_vector / 2**30:.1f} GiB) in krylov_dir {str(directory)!r}, which has "
                f"{free / 2**30:.1f} GiB free: "
                f"{free // per_vector} vectors fit; lower {knob} or choose another directory")
    in_memory = n_returned + (n_basis if krylov_dir is None else 0)
    available = available_memory_bytes(parameter.device)
    need = in_memory * per_vector
    if available is None or need <= KRYLOV_MEMORY_SHARE * available:
        return
    fits = int(KRYLOV_MEMORY_SHARE * available // per_vector)
    raise CurvatureError(
        f"{request} keeps {in_memory} full-length vectors of {space.size:,} weights in memory "
        f"({need / 2**30:.1f} GiB in {parameter.dtype}), more than {KRYLOV_MEMORY_SHARE:.0%} of the "
        f"{available / 2**30:.1f} GiB available on {parameter.device}: "
        f"{fits} vectors fit; lower {knob}, select fewer layers"
        + ("" if krylov_dir is not None or n_basis == 0 else ", keep the basis on disk (krylov_dir)")
        + " or use a larger machine")


class _MappedBasisBackend(SingleDeviceBackend):
    """hessian-eigenthings' vector arithmetic, except that ``scale``, which Lanczos uses to make each new (unit)
    basis vector, writes its result into a new memory-mapped file: the basis lives in the page cache, which the
    operating system can write out, instead of in process memory. Same kernels, so bit-identical results."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.n_files = 0

    def scale(self, alpha: float | torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        path = self.directory / f"v{self.n_files:06d}.f{a.element_size()}"
        self.n_files += 1
        out = torch.from_file(str(path), shared=True, size=a.numel(), dtype=a.dtype).view(a.shape)
        return torch.mul(a, alpha, out=out)


@contextlib.contextmanager
def _krylov_backend(krylov_dir: str | os.PathLike | None):
    """The vector backend of a Lanczos run: in memory (``None``), or mapped files in a temporary folder under
    ``krylov_dir`` that is removed when the run ends."""
    if krylov_dir is None:
        yield SingleDeviceBackend()
        return
    with tempfile.TemporaryDirectory(prefix="krylov-", dir=krylov_dir) as folder:
        yield _MappedBasisBackend(Path(folder))


def _check_problem(model: nn.Module, data: TokenSet, operator: str, batch_size: int,
                   needs_double_backward: bool = True) -> None:
    if not isinstance(data, TokenSet):
        raise CurvatureError(f"data must be a landscape.data.TokenSet, got {type(data).__name__}")
    if data.n_scored_tokens == 0:
        raise CurvatureError(f"data {data.name} has no scored tokens")
    if operator not in OPERATORS:
        raise CurvatureError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CurvatureError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_curvature_model(model, needs_double_backward)
    try:
        check_in_vocabulary(model, data)
    except ValueError as err:
        raise CurvatureError(str(err)) from None


def check_curvature_model(model: nn.Module, needs_double_backward: bool = True) -> None:
    """Raise :class:`CurvatureError` unless the model is in eval mode with eager attention (needed for HVPs)."""
    if model.training:
        raise CurvatureError("model is in train mode (dropout makes the curvature random): call model.eval() "
                             "or landscape.models.prepare_model(model) first")
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "eager") or "eager"
    if needs_double_backward and attention != "eager":
        raise CurvatureError(f"model uses attn_implementation={attention!r}, which has no double backward on CPU; "
                             f"curvature needs 'eager': load it with landscape.models.load_model or call "
                             f"landscape.models.prepare_model(model)")


def _check_interval_request(level: float | None, n_resamples: int, n_units: int, unit: str,
                            batch_size: int | None, data: TokenSet) -> None:
    if level is None:
        return
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise CurvatureError(f"level must be a coverage in (0, 1) such as 0.95, or None for no interval; got {level!r}")
    if not isinstance(n_resamples, int) or n_resamples < 100:
        raise CurvatureError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    if n_units < 2:
        how = f" with batch_size={batch_size}; use a smaller batch_size" if batch_size else ""
        raise CurvatureError(f"an interval needs >= 2 {unit}: {data.n_segments} segment(s) give {n_units}{how}")


def _norm(tensors: Mapping[str, torch.Tensor], layers: Sequence[str]) -> float:
    """Euclidean norm over every entry of the named layers' tensors, in float64."""
    return math.sqrt(sum(float(tensors[n].double().pow(2).sum()) for n in layers))


def _batches(data: TokenSet, batch_size: int) -> list[Batch]:
    """A re-iterable list of ``(tokens, score_mask)`` batches (operators iterate it once per product)."""
    return list(data.batches(batch_size))


def _scored_tokens(batches: list[Batch]) -> int:
    return int(sum(int(mask[:, 1:].sum()) for _, mask in batches))


def _provenance(model: nn.Module, data: TokenSet, batch_size: int) -> dict[str, Any]:
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"model": name, "dtype": dtype, "batch_size": batch_size, "data": data.provenance()}


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; floating point as float64 (bool and integer tensors keep their type)."""
    array = t.detach().cpu().numpy()
    return array.astype(np.float64) if t.is_floating_point() else array
