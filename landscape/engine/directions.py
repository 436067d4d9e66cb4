"""Directions in weight space around the pretrained weights w0.

A :class:`Direction` is a map ``layer name -> (out_features, in_features) tensor`` over a chosen subset of
layers (by default every quantizable linear layer of the decoder; any ``fnmatch`` glob picks others). It
always carries a :class:`DirectionSpec` saying how it was made, so it can be regenerated and stored in
provenance instead of being stored as tensors.

Kinds (``DirectionSpec.kind``):

* ``random``: i.i.d. standard Gaussian entries, regenerated from a seed. Each layer draws from its own
  generator seeded by ``(seed, layer name)``, so a layer's entries do not depend on which other layers
  were selected, nor on the model's dtype (draws are float32, then cast) or device.
* ``displacement``: ``w_q - w0`` toward a quantized model (a :class:`~landscape.quant.result.QuantResult`,
  refused if it was computed on other base weights).
* ``eigenvector``: a Hessian eigenvector (any user tensor map; :mod:`landscape.curvature` produces them).
* ``user``: any other user-supplied tensor map.

Then, in this order (the order :func:`regenerate` replays):

1. normalisation (``DirectionSpec.normalization``): ``none``; ``filter`` (Li et al. 2018: each output row
   ``d[i, :]`` rescaled to the Euclidean norm of the matching row ``w0[i, :]``); ``layer`` (each layer
   rescaled to the Frobenius norm of that layer of w0);
2. Gram-Schmidt against a first direction (``orthogonal_to``), for the second axis of a 2-D slice;
3. rescaling to unit Euclidean norm over all its layers (``unit_norm``).

Conventions: norms and dot products are Euclidean over every entry of every layer of the direction,
computed in float64; a layer missing from one operand counts as zeros. Only weight matrices are
perturbed (never biases or norm gains).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from landscape.quant.result import QuantResult, result_stem
from landscape.weights import (
    ALL_LAYERS,
    Base,
    as_base,
    layer_patterns,
    quantizable_layers,
    select_layers,
    weight_matrix,
    working_dtype,
)

DirectionKind = Literal["random", "displacement", "eigenvector", "user"]
Normalization = Literal["none", "filter", "layer"]
DIRECTION_KINDS: tuple[str, ...] = ("random", "displacement", "eigenvector", "user")
NORMALIZATIONS: tuple[str, ...] = ("none", "filter", "layer")


class DirectionError(ValueError):
    """A direction that does not fit the model: unknown layer, wrong shape, zero or non-finite, other base."""


# ------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class DirectionSpec:
    """How a direction was made: enough to regenerate a random one and to state any one in provenance.

    Attributes:
        kind: ``random``, ``displacement``, ``eigenvector`` or ``user``.
        layers: ``fnmatch`` globs of the layer names it covers (``("*",)``: all quantizable layers).
        seed: the seed of a ``random`` direction (``None`` for the other kinds).
        normalization: ``none``, ``filter`` (per output row, to w0's row norm) or ``layer`` (per layer).
        orthogonal_to: the spec of the direction it was made orthogonal to (Gram-Schmidt), if any.
        unit_norm: rescaled to Euclidean norm 1 over all its layers (last step).
        source: where its tensors came from (a QuantResult path or label, an eigenvector's origin).
        base_fingerprint: :func:`~landscape.models.weights_fingerprint` of w0 on its layers.
    """

    kind: DirectionKind
    layers: tuple[str, ...] = ALL_LAYERS
    seed: int | None = None
    normalization: Normalization = "none"
    orthogonal_to: DirectionSpec | None = None
    unit_norm: bool = False
    source: str = ""
    base_fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in DIRECTION_KINDS:
            raise DirectionError(f"direction kind must be one of {DIRECTION_KINDS}, got {self.kind!r}")
        if self.normalization not in NORMALIZATIONS:
            raise DirectionError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.kind == "random" and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise DirectionError(f"a random direction needs an integer seed, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (nested ``orthogonal_to`` as a dict)."""
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["orthogonal_to"] = self.orthogonal_to.to_dict() if self.orthogonal_to else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DirectionSpec:
        fields = dict(data)
        fields["layers"] = tuple(fields.get("layers", ALL_LAYERS))
        if fields.get("orthogonal_to") is not None:
            fields["orthogonal_to"] = cls.from_dict(fields["orthogonal_to"])
        return cls(**fields)

    def describe(self) -> str:
        """Short human label, e.g. ``random seed 3, filter-normalised, unit``."""
        parts = [f"{self.kind}" + (f" seed {self.seed}" if self.seed is not None else "")
                 + (f" ({self.source})" if self.source else "")]
        if self.normalization != "none":
            parts.append(f"{self.normalization}-normalised")
        if self.orthogonal_to is not None:
            parts.append(f"orthogonal to [{self.orthogonal_to.describe()}]")
        if self.unit_norm:
            parts.append("unit")
        if self.layers != ALL_LAYERS:
            parts.append(f"layers {','.join(self.layers)}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------- the direction
@dataclass(frozen=True)
class Direction:
    """A direction in weight space: layer name -> ``(out, in)`` tensor (same dtype and device as the layer).

    Treat ``tensors`` as read-only; every operation here returns a new Direction.
    """

    tensors: Mapping[str, torch.Tensor]
    spec: DirectionSpec

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def norm(self) -> float:
        """Euclidean norm over every entry of every layer (float64)."""
        return math.sqrt(dot(self, self))

    def unit(self) -> Direction:
        """This direction rescaled to Euclidean norm 1 (the spec records ``unit_norm``)."""
        length = _nonzero_norm(self)
        return Direction({n: t / length for n, t in self.tensors.items()}, replace(self.spec, unit_norm=True))


def dot(a: Direction, b: Direction) -> float:
    """Euclidean inner product over the layers both cover (a layer only one covers contributes 0), float64."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a.tensors if n in b.tensors))


def cosine(a: Direction, b: Direction) -> float:
    """Cosine of the angle between two directions (``dot / (norm * norm)``); both must be nonzero."""
    return dot(a, b) / (_nonzero_norm(a) * _nonzero_norm(b))


def orthogonalize(v: Direction, against: Direction) -> Direction:
    """Gram-Schmidt: ``v - (v.u / u.u) u``, the part of ``v`` orthogonal to ``u = against``.

    The result covers the layers of both. Apply it before :meth:`Direction.unit` (the spec replays
    normalisation, then Gram-Schmidt, then unit rescaling).
    """
    if v.spec.unit_norm or v.spec.orthogonal_to is not None:
        raise DirectionError(f"orthogonalize a direction before rescaling it to unit norm and only once; "
                             f"got [{v.spec.describe()}]")
    coef = dot(v, against) / _nonzero_norm(against) ** 2
    tensors = {n: t.clone() for n, t in v.tensors.items()}
    for n, u in against.tensors.items():
        tensors[n] = tensors[n] - coef * u.to(tensors[n]) if n in tensors else -coef * u
    return Direction(tensors, replace(v.spec, orthogonal_to=against.spec))


def plane_coordinates(point: Direction, u: Direction, v: Direction) -> tuple[float, float]:
    """Coefficients ``(a, b)`` of the orthogonal projection of ``point`` onto ``span(u, v)``: ``a u + b v``.

    Use it to mark an endpoint (e.g. a quantized model's displacement) on a 2-D slice through w0.
    Solves the 2x2 Gram system, so ``u`` and ``v`` need not be orthogonal (they must be independent).
    """
    uu, uv, vv = dot(u, u), dot(u, v), dot(v, v)
    pu, pv = dot(point, u), dot(point, v)
    det = uu * vv - uv * uv
    if det <= 1e-12 * uu * vv:
        raise DirectionError("u and v are (nearly) parallel: they do not span a plane")
    return (pu * vv - pv * uv) / det, (pv * uu - pu * uv) / det


# ------------------------------------------------------------------------------------ layer access
def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``(out, in)`` weight view of the layer ``name`` (any module with a 2-D weight), or a clear
    error."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise DirectionError(f"unknown layer {name!r}; perturbable layers are e.g. "
                             f"{list(quantizable_layers(model))[:3]}") from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise DirectionError(f"layer {name!r} ({type(module).__name__}) has no 2-D weight to perturb")
    return weight_matrix(module)


# ---------------------------------------------------------------------------------------- validation
def check_direction(model: nn.Module | Base, direction: Direction) -> None:
    """Raise :class:`DirectionError` unless ``direction`` fits ``model``: known layers, matching shapes,
    finite entries, nonzero norm, and (if recorded) made on these base weights w0."""
    base = as_base(model)
    model = base.model
    if not direction.tensors:
        raise DirectionError(f"direction [{direction.spec.describe()}] covers no layer")
    check_finite_weights(model, direction.names)
    for name, t in direction.tensors.items():
        w = layer_weight(model, name)
        if tuple(t.shape) != tuple(w.shape):
            raise DirectionError(f"direction [{direction.spec.describe()}] has shape {tuple(t.shape)} "
                                 f"for layer {name!r}, whose (out, in) weight is {tuple(w.shape)}")
        if not torch.isfinite(t).all():
            raise DirectionError(f"direction [{direction.spec.describe()}] has NaN or Inf entries "
                                 f"in layer {name!r}")
    _nonzero_norm(direction)
    expected = direction.spec.base_fingerprint
    if expected and expected != (actual := base.fingerprint(direction.names)):
        raise DirectionError(f"direction [{direction.spec.describe()}] was made on base weights with "
                             f"fingerprint {expected}, but this model's weights on those layers have "
                             f"fingerprint {actual}")


def check_finite_weights(model: nn.Module, names: Sequence[str]) -> None:
    """Raise :class:`DirectionError` if a named layer's w0 holds NaN or Inf: there is no landscape around it
    (and a normalised direction would inherit the non-finite values)."""
    for name in names:
        w = layer_weight(model, name)
        if not torch.isfinite(w).all():
            first = (~torch.isfinite(w)).nonzero()[0].tolist()
            raise DirectionError(f"layer {name!r} of the model has NaN or Inf weights (first at (out, in) "
                                 f"index {first}): w0 must be finite to perturb around it")


def _nonzero_norm(direction: Direction) -> float:
    length = math.sqrt(dot(direction, direction))
    if not length > 0 or not math.isfinite(length):
        raise DirectionError(f"direction [{direction.spec.describe()}] has norm {length}: "
                             f"it must be finite and nonzero")
    return length


# -------------------------------------------------------------------------------------- constructors
def random_direction(model: nn.Module | Base, seed: int, normalization: Normalization = "filter",
                     layers: str | Sequence[str] = ALL_LAYERS) -> Direction:
    """A Gaussian random direction over the selected layers, regenerable from ``seed``.

    ``normalization="filter"`` (the default, Li et al. 2018) makes every output row as long as w0's row,
    so the perturbation is scale-aware; ``"layer"`` does it per layer; ``"none"`` keeps N(0, 1) entries.
    """
    return regenerate(model, DirectionSpec("random", layer_patterns(layers), seed=seed,
                                           normalization=normalization))


def random_direction_of_length(model: nn.Module | Base, seed: int, length: float) -> dict[str, torch.Tensor]:
    """A random filter-normalised direction rescaled to Euclidean norm ``length`` (``layer -> (out, in)``):
    the baseline of the same length as a displacement."""
    unit = random_direction(model, seed, "filter").unit()
    return {n: length * t for n, t in unit.tensors.items()}


def displacement_direction(model: nn.Module | Base, result: Any,
                           layers: str | Sequence[str] = ALL_LAYERS) -> Direction:
    """``w_q - w0`` toward a quantized model, on the result's layers that match ``layers``.

    Args:
        result: a :class:`~landscape.quant.result.QuantResult` or the path it was saved to (the path is
            recorded, so the direction can be regenerated).

    Raises:
        DirectionError: if the result was computed on other base weights (its ``base_fingerprint``
            differs from :func:`~landscape.models.weights_fingerprint` of this model on the result's
            layers, in the result's order) or no layer matches.
    """
    base = as_base(model)
    model = base.model
    source = ""
    if isinstance(result, (str, os.PathLike)):
        source = str(quant_result_path(result))
        result = QuantResult.load(source)
    if not isinstance(result, QuantResult):
        raise DirectionError(f"a displacement needs a QuantResult or the path of one, "
                             f"got {type(result).__name__}")
    actual = base.fingerprint(list(result.weights))
    if result.base_fingerprint != actual:
        raise DirectionError(f"quantized model {result.label!r} was computed on base {result.base_model!r} "
                             f"(fingerprint {result.base_fingerprint or 'missing'}), not on this model "
                             f"(fingerprint {actual})")
    patterns = layer_patterns(layers)
    names = [n for n in result.weights if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise DirectionError(f"layer globs {list(patterns)} match none of the {len(result.weights)} "
                             f"layers of {result.label!r} (e.g. {list(result.weights)[:3]})")
    tensors = {}
    for n in names:
        w0 = layer_weight(model, n).detach()
        if tuple(result.weights[n].shape) != tuple(w0.shape):
            raise DirectionError(f"quantized model {result.label!r} has a weight of shape "
                                 f"{tuple(result.weights[n].shape)} for layer {n!r}, "
                                 f"whose (out, in) weight is {tuple(w0.shape)}")
        # w_q as the model would hold it, the difference formed in float32 for bf16 / fp16 and rounded once
        w_q, work = result.weights[n].to(device=w0.device, dtype=w0.dtype), working_dtype(w0.dtype)
        tensors[n] = (w_q.to(work) - w0.to(work)).to(w0.dtype)
    spec = DirectionSpec("displacement", patterns, source=source or result.label,
                         base_fingerprint=base.fingerprint(names))
    return Direction(tensors, spec)


def quant_result_path(path: str | os.PathLike) -> Path:
    """A saved QuantResult's path without its ``.json`` / ``.safetensors`` suffix, as displacement specs
    record it."""
    return result_stem(path)


def eigenvector_direction(model: nn.Module | Base, tensors: Mapping[str, torch.Tensor],
                          source: str = "") -> Direction:
    """A Hessian eigenvector given as layer name -> ``(out, in)`` tensor; ``source`` says where it came
    from."""
    return _from_tensors(model, tensors, "eigenvector", source)


def user_direction(model: nn.Module | Base, tensors: Mapping[str, torch.Tensor],
                   source: str = "") -> Direction:
    """Any user-supplied direction: layer name -> ``(out, in)`` tensor (checked against the model)."""
    return _from_tensors(model, tensors, "user", source)


def _from_tensors(model: nn.Module | Base, tensors: Mapping[str, torch.Tensor], kind: DirectionKind,
                  source: str) -> Direction:
    base = as_base(model)
    model = base.model
    names = list(tensors)
    if not names:
        raise DirectionError(f"a {kind} direction needs at least one layer tensor, got none")
    draft = Direction(dict(tensors), DirectionSpec(kind, tuple(names), source=source))
    check_direction(base, draft)  # names, shapes, finiteness, nonzero: before any conversion
    out = {}
    for n in names:
        w0 = layer_weight(model, n)
        out[n] = tensors[n].detach().to(device=w0.device, dtype=w0.dtype).clone()
    return Direction(out, replace(draft.spec, base_fingerprint=base.fingerprint(names)))


def normalize(model: nn.Module | Base, direction: Direction, normalization: Normalization) -> Direction:
    """Rescale a direction to the scale of w0: per output row (``filter``), per layer (``layer``) or not
    (``none``).

    ``filter``: ``d[i, :] * ||w0[i, :]|| / ||d[i, :]||`` for every output row ``i`` (a row of ``d`` that is
    zero stays zero). ``layer``: ``d * ||w0|| / ||d||`` per layer. Apply it before Gram-Schmidt and unit
    rescaling.
    """
    model = as_base(model).model
    if normalization not in NORMALIZATIONS:
        raise DirectionError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if direction.spec.normalization != "none" or direction.spec.orthogonal_to or direction.spec.unit_norm:
        raise DirectionError(f"normalise a raw direction only (before Gram-Schmidt and unit rescaling); "
                             f"got [{direction.spec.describe()}]")
    if normalization == "none":
        return direction
    dim = 1 if normalization == "filter" else (0, 1)
    tensors = {}
    for name, d in direction.tensors.items():
        w0 = layer_weight(model, name).detach()
        d_norm = d.norm(dim=dim, keepdim=True)
        scale = torch.where(d_norm > 0, w0.to(d).norm(dim=dim, keepdim=True) / d_norm,
                            torch.zeros_like(d_norm))
        tensors[name] = d * scale
    return Direction(tensors, replace(direction.spec, normalization=normalization))


def check_spec(model: nn.Module | Base, spec: DirectionSpec) -> list[str]:
    """The layers ``spec`` covers on ``model``; raises :class:`DirectionError` unless :func:`regenerate` can
    rebuild it there: a random direction whose layers exist, or a displacement saved to a path, made on
    these base weights w0. Cheap (no tensors are drawn or loaded): a sweep checks every spec before it
    starts."""
    base = as_base(model)
    names = _base_layers(base, spec)[0]
    if spec.orthogonal_to is not None:
        names += [n for n in check_spec(base, spec.orthogonal_to) if n not in names]
    return names


def _base_layers(base: Base, spec: DirectionSpec) -> tuple[list[str], str]:
    """The layers of a regenerable spec's base tensors and the fingerprint of w0 on them, checked against the
    spec's."""
    if spec.kind == "random":
        names = select_layers(base.model, spec.layers)
    elif spec.kind == "displacement" and os.path.exists(f"{spec.source}.json"):
        names = [n for n in json.loads(Path(f"{spec.source}.json").read_text())["layers"]
                 if any(fnmatch.fnmatchcase(n, p) for p in spec.layers)]
    else:
        raise DirectionError(f"cannot regenerate a {spec.kind} direction from its spec [{spec.describe()}]: "
                             f"only random directions and displacements saved to a path are; "
                             f"pass the tensors instead")
    check_finite_weights(base.model, names)
    actual = base.fingerprint(names)
    if spec.base_fingerprint and spec.base_fingerprint != actual:
        raise DirectionError(f"direction [{spec.describe()}] was made on base weights with fingerprint "
                             f"{spec.base_fingerprint}, this model's weights on its layers have {actual}")
    return names, actual


def regenerate(model: nn.Module | Base, spec: DirectionSpec) -> Direction:
    """Rebuild a direction from its spec (random kinds from the seed; displacements from a saved path).

    Replays: base tensors, normalisation, Gram-Schmidt against ``spec.orthogonal_to``, unit rescaling.
    Eigenvector and user directions are not regenerable (their tensors live where they were made).
    """
    base = as_base(model)
    if spec.orthogonal_to is not None:
        check_spec(base, spec.orthogonal_to)  # the whole spec is checked before any tensor is drawn
    names, fingerprint = _base_layers(base, spec)
    if spec.kind == "random":
        raw = DirectionSpec("random", spec.layers, seed=spec.seed, base_fingerprint=fingerprint)
        drawn = _gaussian(base.model, names, raw)
    else:
        drawn = displacement_direction(base, spec.source, spec.layers)
    direction = normalize(base, drawn, spec.normalization)
    if spec.orthogonal_to is not None:
        direction = orthogonalize(direction, regenerate(base, spec.orthogonal_to))
    return direction.unit() if spec.unit_norm else direction


def _gaussian(model: nn.Module, names: Sequence[str], spec: DirectionSpec) -> Direction:
    tensors = {}
    for name in names:
        w0 = layer_weight(model, name)
        generator = torch.Generator().manual_seed(_layer_seed(spec.seed, name))
        draw = torch.randn(tuple(w0.shape), generator=generator, dtype=torch.float32)  # (out, in), on CPU
        tensors[name] = draw.to(device=w0.device, dtype=w0.dtype)
    return Direction(tensors, spec)


def _layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one layer of a random direction, from (seed, layer name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1
