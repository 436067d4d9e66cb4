"""The weights a curvature is taken over, the directions it is taken along, and the checks made first.

A curvature lives on the flat vector space of some quantizable layers' weights (:class:`WeightSpace`); vectors
enter and leave it as ``layer name -> (out, in)`` tensor maps (:func:`landscape.weights.weight_matrix`
orientation). Every check a measurement needs (data, settings, model mode and attention, vocabulary, layer
selection, direction shapes) lives here, so that a bad request fails with a :class:`CurvatureError` before the
first forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from landscape.data import TokenSet
from landscape.engine.directions import Direction as ToolkitDirection
from landscape.objectives import check_in_vocabulary
from landscape.weights import (
    LayerSelection,
    quantizable_layers,
    select_layers,
    weight_is_transposed,
    weight_matrix,
    weights_fingerprint,
)

OperatorKind = Literal["hessian", "ggn"]
OPERATORS: tuple[str, ...] = ("hessian", "ggn")
# A landscape.engine.directions.Direction, or any mapping layer name -> (out, in) tensor.
Direction = ToolkitDirection | Mapping[str, torch.Tensor]


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
        """``layer -> (out, in)`` map (exactly these layers) to a flat ``(size,)`` vector with ``like``'s
        dtype and device, copied in a layer at a time (a streamed direction's layers are read one by one)."""
        flat = torch.empty(self.size, dtype=like.dtype, device=like.device)
        for layer, part in self.views(flat).items():
            part.copy_(tensors[layer])  # (out, in)
        return flat

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``layer -> (out, in)`` views of a flat ``(size,)`` vector (no copy: a write to one is a write to
        the other)."""
        out, offset = {}, 0
        for layer, (rows, cols), transposed in zip(self.layers, self.shapes, self.transposed):
            piece = flat[offset : offset + rows * cols]
            offset += rows * cols
            out[layer] = piece.view(cols, rows).T if transposed else piece.view(rows, cols)
        return out

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
            ``"*.mlp.*"``); or a sequence of them. Each entry must match at least one quantizable layer
            (:func:`landscape.weights.select_layers`; else
            :class:`~landscape.weights.LayerSelectionError`).

    Raises:
        CurvatureError: a selected weight that is not a parameter of the model, does not require gradients, or
            holds NaN or Inf.
    """
    available = quantizable_layers(model)
    chosen = select_layers(model, layers)
    param_names = {id(p): n for n, p in model.named_parameters()}
    order = {n: i for i, n in enumerate(param_names.values())}
    entries = []
    for layer in chosen:
        param = available[layer].weight
        matrix = weight_matrix(available[layer])  # (out, in)
        if id(param) not in param_names:
            raise CurvatureError(f"the weight of layer {layer!r} is not a parameter of this model")
        if not param.requires_grad:
            raise CurvatureError(f"the weight of layer {layer!r} has requires_grad=False: curvature needs "
                                 f"gradients (call .requires_grad_(True) on it)")
        if not torch.isfinite(matrix).all():
            first = (~torch.isfinite(matrix)).nonzero()[0].tolist()
            raise CurvatureError(f"the weight of layer {layer!r} holds NaN or Inf (first at (out, in) index "
                                 f"{first}): the curvature at a non-finite w0 is undefined; weights must be "
                                 f"finite")
        transposed = weight_is_transposed(available[layer])
        name = param_names[id(param)]
        entries.append((order[name], layer, name, tuple(matrix.shape), transposed))
    entries.sort()  # in model.named_parameters() order
    return WeightSpace(tuple(e[1] for e in entries), tuple(e[2] for e in entries),
                       tuple(e[3] for e in entries), tuple(e[4] for e in entries))


def direction_space(model: nn.Module, direction: Direction) -> WeightSpace:
    """Validate a direction against ``model`` and return the weight space of its layers.

    Args:
        direction: a :class:`landscape.engine.directions.Direction` or any mapping layer name -> ``(out, in)``
            tensor over quantizable layers.

    Raises:
        DirectionMismatchError: unknown layer names, wrong shapes (e.g. a Conv1D ``(in, out)`` tensor or a
            direction from another model), non-finite values, an all-zero direction, or a Direction whose
            recorded base fingerprint is not this model's w0.
    """
    tensors = direction_tensors(direction)
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
            raise DirectionMismatchError(f"direction[{layer!r}] must be a torch.Tensor, got "
                                         f"{type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            transposed = tuple(tensor.shape) == shape[::-1]
            hint = (" (it looks transposed: directions use the (out, in) orientation of "
                    "models.weight_matrix, while GPT-2 Conv1D parameters are stored (in, out))"
                    if transposed else " (a direction from another model?)")
            raise DirectionMismatchError(f"direction[{layer!r}] has shape {tuple(tensor.shape)}, the layer's "
                                         f"(out, in) weight is {shape}{hint}")
        if not torch.isfinite(tensor).all():
            raise DirectionMismatchError(f"direction[{layer!r}] contains non-finite values")
        total += float(tensor.double().pow(2).sum())
    if total == 0.0:
        raise DirectionMismatchError("direction is zero everywhere: a curvature along it is undefined")
    recorded = getattr(getattr(direction, "spec", None), "base_fingerprint", "")
    if recorded and recorded != (actual := weights_fingerprint(model, list(space.layers))):
        raise DirectionMismatchError(f"direction was made on base weights with fingerprint {recorded}, but "
                                     f"this model's weights on its layers have fingerprint {actual}")
    return space


def direction_tensors(direction: Direction) -> Mapping[str, torch.Tensor]:
    """The ``layer -> (out, in)`` tensors of a landscape.engine.directions.Direction (``.tensors``) or of a
    mapping."""
    tensors = getattr(direction, "tensors", direction)
    if not isinstance(tensors, Mapping) or not tensors:
        raise DirectionMismatchError(f"a direction is a landscape.engine.directions.Direction or a non-empty "
                                     f"mapping layer name -> (out, in) tensor, got "
                                     f"{type(direction).__name__}")
    return tensors


def direction_norm(tensors: Mapping[str, torch.Tensor], layers: Sequence[str]) -> float:
    """Euclidean norm over every entry of the named layers' tensors, in float64 (weight units)."""
    return math.sqrt(sum(float(tensors[n].double().pow(2).sum()) for n in layers))


# ------------------------------------------------------------------------------------------- checks
def check_problem(model: nn.Module, data: TokenSet, operator: str, batch_size: int) -> None:
    """Raise :class:`CurvatureError` unless ``data`` is a TokenSet with scored tokens inside the model's
    vocabulary, ``operator`` is known, ``batch_size`` is a positive integer and the model is in eval mode.

    The attention check (eager, for double backward) is :func:`check_curvature_model`'s, made by the
    measurements that need Hessian-vector products.
    """
    if not isinstance(data, TokenSet):
        raise CurvatureError(f"data must be a landscape.data.TokenSet, got {type(data).__name__}")
    if data.n_scored_tokens == 0:
        raise CurvatureError(f"data {data.name} has no scored tokens")
    if operator not in OPERATORS:
        raise CurvatureError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CurvatureError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_curvature_model(model, needs_double_backward=False)
    try:
        check_in_vocabulary(model, data)
    except ValueError as err:
        raise CurvatureError(str(err)) from None


def check_curvature_model(model: nn.Module, needs_double_backward: bool = True) -> None:
    """Raise :class:`CurvatureError` unless the model is in eval mode and, if ``needs_double_backward``, has
    eager attention (Hessian-vector products need a double backward)."""
    if model.training:
        raise CurvatureError("model is in train mode (dropout makes the curvature random): call model.eval() "
                             "or landscape.models.prepare_model(model) first")
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "eager") or "eager"
    if needs_double_backward and attention != "eager":
        raise CurvatureError(f"model uses attn_implementation={attention!r}, which has no double backward on "
                             f"CPU; curvature needs 'eager': load it with landscape.models.load_model or "
                             f"call landscape.models.prepare_model(model)")


def check_interval_request(level: float | None, n_resamples: int, n_units: int, unit: str,
                           batch_size: int | None, data: TokenSet) -> None:
    """Raise :class:`CurvatureError` unless ``level`` is ``None`` (no interval) or a coverage in (0, 1) with
    ``n_resamples >= 100`` and at least two ``unit`` (batches of ``batch_size`` segments, or segments)."""
    if level is None:
        return
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise CurvatureError(f"level must be a coverage in (0, 1) such as 0.95, or None for no interval; "
                             f"got {level!r}")
    if not isinstance(n_resamples, int) or n_resamples < 100:
        raise CurvatureError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    if n_units < 2:
        how = f" with batch_size={batch_size}; use a smaller batch_size" if batch_size else ""
        raise CurvatureError(f"an interval needs >= 2 {unit}: {data.n_segments} segment(s) give "
                             f"{n_units}{how}")
