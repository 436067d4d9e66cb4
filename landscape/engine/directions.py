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
  refused if it was computed on other base weights or its weights are off the grid it states). Its spec
  records the result's identity, the sha256 of its tensors (``content_hash``): a direction regenerated from
  a path whose result was replaced is refused, and so is a resumed run (the stored spec differs).
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

**Streamed directions** (``streamed=True`` on the constructors and :func:`regenerate`): the tensors are a
:class:`LayerwiseTensors` map that computes a layer when it is asked for (a random layer redrawn from its
seed, a displacement's layer read from its safetensors file) and holds only the last one, so a direction
never sits in memory whole; normalisation, Gram-Schmidt and unit rescaling keep it streamed (their global
scalars are computed in one pass, a layer at a time). A streamed layer equals the eager one bit for bit; it
costs its recomputation at every access. A streamed displacement reads w0 from the model when a layer is
asked for: ask while the model holds w0 (as :class:`~landscape.engine.perturb.Perturbation` does).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from landscape.quant.formats import parse_format
from landscape.quant.result import (
    QuantResult,
    ResultMismatchError,
    check_on_grid,
    read_result_metadata,
    recorded_tensors_sha256,
    result_stem,
    saved_tensors_sha256,
    tensors_sha256,
)
from landscape.weights import (
    ALL_LAYERS,
    Base,
    as_base,
    layer_patterns,
    quantizable_layers,
    row_blocks,
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
        content_hash: a displacement's result, by content: its
            :func:`~landscape.quant.result.tensors_sha256` (64 hex); ``""`` for the other kinds and for
            displacements recorded before it existed (:meth:`to_dict` then leaves it out, so their provenance
            reads as before).
    """

    kind: DirectionKind
    layers: tuple[str, ...] = ALL_LAYERS
    seed: int | None = None
    normalization: Normalization = "none"
    orthogonal_to: DirectionSpec | None = None
    unit_norm: bool = False
    source: str = ""
    base_fingerprint: str = ""
    content_hash: str = ""

    def __post_init__(self) -> None:
        if self.kind not in DIRECTION_KINDS:
            raise DirectionError(f"direction kind must be one of {DIRECTION_KINDS}, got {self.kind!r}")
        if self.normalization not in NORMALIZATIONS:
            raise DirectionError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.kind == "random" and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise DirectionError(f"a random direction needs an integer seed, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (nested ``orthogonal_to`` as a dict; ``content_hash`` only where there is one)."""
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["orthogonal_to"] = self.orthogonal_to.to_dict() if self.orthogonal_to else None
        if not self.content_hash:
            del out["content_hash"]
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
class LayerwiseTensors(Mapping[str, torch.Tensor]):
    """A read-only map ``layer name -> tensor`` whose tensors are computed when asked for, one at a time.

    The last tensor asked for is remembered as long as someone else still holds it (a weak reference), so
    directions built on the same one (``d.unit()`` and a direction orthogonalised against ``d``) share a
    layer while it is in use, and a streamed direction holds no layer once its user lets go. Never modify a
    tensor it returns.
    """

    def __init__(self, names: Sequence[str], compute: Callable[[str], torch.Tensor]):
        self._names = tuple(names)
        self._known = frozenset(self._names)
        self._compute = compute
        self._last: tuple[str, weakref.ref[torch.Tensor]] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == name and (alive := self._last[1]()) is not None:
            return alive
        if name not in self._known:
            raise KeyError(name)
        tensor = self._compute(name)
        self._last = (name, weakref.ref(tensor))
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LayerwiseTensors({len(self._names)} layers, computed when asked for)"


def _layerwise(names: Sequence[str], compute: Callable[[str], torch.Tensor],
               streamed: bool) -> Mapping[str, torch.Tensor]:
    """``compute`` over ``names``: every layer now (a dict), or each when asked for (``streamed``)."""
    return LayerwiseTensors(names, compute) if streamed else {n: compute(n) for n in names}


@dataclass(frozen=True)
class Direction:
    """A direction in weight space: layer name -> ``(out, in)`` tensor (same dtype and device as the layer).

    Treat ``tensors`` as read-only; every operation here returns a new Direction (streamed if this one is).
    """

    tensors: Mapping[str, torch.Tensor]
    spec: DirectionSpec

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def streamed(self) -> bool:
        """Whether the tensors are computed layer by layer when asked for (:class:`LayerwiseTensors`)."""
        return isinstance(self.tensors, LayerwiseTensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def norm(self) -> float:
        """Euclidean norm over every entry of every layer (float64)."""
        return math.sqrt(dot(self, self))

    def unit(self) -> Direction:
        """This direction rescaled to Euclidean norm 1 (the spec records ``unit_norm``)."""
        length, tensors = _nonzero_norm(self), self.tensors
        return Direction(_layerwise(self.names, lambda n: tensors[n] / length, self.streamed),
                         replace(self.spec, unit_norm=True))

    def whole(self) -> Direction:
        """This direction with every layer computed now and held (the same tensors bit for bit); a direction
        that is already whole is returned as it is.

        Build a chain streamed (``displacement -> orthogonalize -> unit``) and make only its last link whole:
        the links before it then hold no layer, where whole ones would each hold a copy of the direction."""
        if not self.streamed:
            return self
        return Direction({n: self.tensors[n] for n in self.names}, self.spec)


def dot(a: Direction, b: Direction) -> float:
    """Euclidean inner product over the layers both cover (a layer only one covers contributes 0), float64,
    summed a block of rows at a time (:func:`landscape.weights.row_blocks`); a streamed layer is computed
    once, also for ``dot(d, d)``."""
    total = 0.0
    for n in a.tensors:
        if n in b.tensors:
            x = a[n]
            y = x if b is a else b[n]
            blocks = zip(row_blocks(x), row_blocks(y))
            total += sum(float((xb.double() * yb.double()).sum()) for xb, yb in blocks)
    return total


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
    mine, theirs = v.tensors, against.tensors

    def layer(n: str) -> torch.Tensor:
        if n not in theirs:
            return mine[n].clone()
        return mine[n] - coef * theirs[n].to(mine[n]) if n in mine else -coef * theirs[n]

    names = v.names + [n for n in against.names if n not in mine]
    return Direction(_layerwise(names, layer, v.streamed or against.streamed),
                     replace(v.spec, orthogonal_to=against.spec))


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
                     layers: str | Sequence[str] = ALL_LAYERS, *, streamed: bool = False) -> Direction:
    """A Gaussian random direction over the selected layers, regenerable from ``seed``.

    ``normalization="filter"`` (the default, Li et al. 2018) makes every output row as long as w0's row,
    so the perturbation is scale-aware; ``"layer"`` does it per layer; ``"none"`` keeps N(0, 1) entries.
    ``streamed``: each layer redrawn when asked for (see the module docstring).
    """
    return regenerate(model, DirectionSpec("random", layer_patterns(layers), seed=seed,
                                           normalization=normalization), streamed=streamed)


def random_direction_of_length(model: nn.Module | Base, seed: int,
                               length: float) -> Mapping[str, torch.Tensor]:
    """A random filter-normalised direction rescaled to Euclidean norm ``length`` (``layer -> (out, in)``):
    the baseline of the same length as a displacement. Its layers are drawn when asked for (the same numbers
    every time, :class:`LayerwiseTensors`): a curvature along it holds only its own flat copy."""
    unit = random_direction(model, seed, "filter", streamed=True).unit()
    return LayerwiseTensors(unit.names, lambda n: length * unit[n])


def displacement_direction(model: nn.Module | Base, result: Any,
                           layers: str | Sequence[str] = ALL_LAYERS, *, streamed: bool = False) -> Direction:
    """``w_q - w0`` toward a quantized model, on the result's layers that match ``layers``.

    Args:
        result: a :class:`~landscape.quant.result.QuantResult` or the path it was saved to (the path is
            recorded, so the direction can be regenerated); either way the spec records the sha256 of its
            tensors (``content_hash``).
        streamed: each layer's difference formed when asked for (from a path: ``w_q`` of that layer read
            from the safetensors file, the file never loaded whole; the file's sha256 is verified first, one
            layer at a time, and a file replaced while the direction is in use is refused when a layer is
            read).

    Raises:
        DirectionError: if the result was computed on other base weights (its ``base_fingerprint``
            differs from :func:`~landscape.models.weights_fingerprint` of this model on the result's
            layers, in the result's order), a layer's shape differs from the model's, its weights are off
            the grid its format states (:meth:`~landscape.quant.result.QuantResult.check_grid`), or no layer
            matches. ResultIntegrityError: a saved result changed since it was saved.
    """
    base = as_base(model)
    model = base.model
    source, quantized = "", result
    if isinstance(result, (str, os.PathLike)):
        source = str(quant_result_path(result))
        quantized = _SavedWeights(source) if streamed else QuantResult.load(source)
    if not isinstance(quantized, (QuantResult, _SavedWeights)):
        raise DirectionError(f"a displacement needs a QuantResult or the path of one, "
                             f"got {type(result).__name__}")
    actual = base.fingerprint(list(quantized.weights))
    if quantized.base_fingerprint != actual:
        raise DirectionError(f"quantized model {quantized.label!r} was computed on base "
                             f"{quantized.base_model!r} (fingerprint "
                             f"{quantized.base_fingerprint or 'missing'}), not on this model "
                             f"(fingerprint {actual})")
    patterns = layer_patterns(layers)
    names = [n for n in quantized.weights if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise DirectionError(f"layer globs {list(patterns)} match none of the {len(quantized.weights)} "
                             f"layers of {quantized.label!r} (e.g. {list(quantized.weights)[:3]})")
    for n in names:
        shape = (quantized.shapes[n] if isinstance(quantized, _SavedWeights)
                 else tuple(quantized.weights[n].shape))
        if shape != (expected := tuple(layer_weight(model, n).shape)):
            raise DirectionError(f"quantized model {quantized.label!r} has a weight of shape {shape} "
                                 f"for layer {n!r}, whose (out, in) weight is {expected}")
    try:
        used = LayerwiseTensors(names, lambda n: quantized.weights[n])  # one layer at a time
        check_on_grid(used, quantized.format, quantized.method, quantized.extra, base,
                      f"quantized model {source or quantized.label!r}")
    except ResultMismatchError as err:
        raise DirectionError(str(err)) from None
    content_hash = (quantized.content_hash if isinstance(quantized, _SavedWeights)
                    else tensors_sha256(quantized.weights))

    def layer(n: str) -> torch.Tensor:
        # w_q as the model would hold it, the difference formed in float32 for bf16 / fp16 and rounded once
        w0 = layer_weight(model, n).detach()
        w_q, work = quantized.weights[n].to(device=w0.device, dtype=w0.dtype), working_dtype(w0.dtype)
        return (w_q.to(work) - w0.to(work)).to(w0.dtype)

    spec = DirectionSpec("displacement", patterns, source=source or quantized.label,
                         base_fingerprint=base.fingerprint(names), content_hash=content_hash)
    return Direction(_layerwise(names, layer, streamed), spec)


class _SavedWeights:
    """A saved QuantResult's metadata, with its weights read one layer at a time from the safetensors file
    (what a streamed displacement needs of a :class:`~landscape.quant.result.QuantResult`).

    The tensors' sha256 is verified (one layer at a time) when it is made; a layer read after either file
    was replaced or modified (another inode, size or modification time) is refused, so a streamed direction
    never mixes two results."""

    def __init__(self, stem: str):
        self.path, self.stem = f"{stem}.safetensors", stem
        try:
            self._identity = _files_identity(stem)  # before anything is read: a later replacement is caught
        except FileNotFoundError:
            read_result_metadata(stem)  # says which file of the pair is missing
            raise
        meta = read_result_metadata(stem)
        self.label = f"{meta['method']} {meta['format'] or 'fp32'}"  # as QuantResult.label
        self.base_model, self.base_fingerprint = meta["base_model"], meta["base_fingerprint"]
        self.format = parse_format(meta["format"]) if meta["format"] else None
        self.method, self.extra = meta["method"], meta["extra"]
        self.content_hash = saved_tensors_sha256(stem)
        with safe_open(self.path, framework="pt") as f:
            stored = set(f.keys())
            self.shapes = {n: tuple(f.get_slice(n).get_shape()) for n in stored}
        if stored != set(meta["layers"]):
            raise DirectionError(f"{self.path}: the tensors do not match the layers listed in {stem}.json")
        self.weights = LayerwiseTensors(meta["layers"], self._read)

    def _read(self, name: str) -> torch.Tensor:
        if _files_identity(self.stem) != self._identity:
            raise DirectionError(f"the saved result {self.stem} was replaced or modified while a direction "
                                 f"read it (its sha256 was {self.content_hash[:16]}): a direction never "
                                 f"mixes two results; run again on one result")
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)


def _files_identity(stem: str) -> tuple[tuple[int, int, int, int], ...]:
    """Device, inode, size and modification time of a saved result's two files: what changes when either is
    replaced or rewritten."""
    stats = [os.stat(f"{stem}{ext}") for ext in (".safetensors", ".json")]
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


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
    # w0's row (or layer) norms now: a streamed layer is normalised later without reading w0 again
    w0_norms = {n: layer_weight(model, n).detach().norm(dim=dim, keepdim=True) for n in direction.names}
    raw = direction.tensors

    def layer(name: str) -> torch.Tensor:
        d = raw[name]
        d_norm = d.norm(dim=dim, keepdim=True)
        return d * torch.where(d_norm > 0, w0_norms[name].to(d) / d_norm, torch.zeros_like(d_norm))

    return Direction(_layerwise(direction.names, layer, direction.streamed),
                     replace(direction.spec, normalization=normalization))


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
        meta = read_result_metadata(spec.source)
        recorded = recorded_tensors_sha256(meta)
        if spec.content_hash and recorded is not None and recorded != spec.content_hash:
            raise DirectionError(_replaced(spec, recorded))
        names = [n for n in meta["layers"] if any(fnmatch.fnmatchcase(n, p) for p in spec.layers)]
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


def regenerate(model: nn.Module | Base, spec: DirectionSpec, *, streamed: bool = False) -> Direction:
    """Rebuild a direction from its spec (random kinds from the seed; displacements from a saved path).

    Replays: base tensors, normalisation, Gram-Schmidt against ``spec.orthogonal_to``, unit rescaling.
    Eigenvector and user directions are not regenerable (their tensors live where they were made).
    ``streamed``: every layer computed when asked for, never the whole direction at once (equal bit for bit).
    """
    base = as_base(model)
    if spec.orthogonal_to is not None:
        check_spec(base, spec.orthogonal_to)  # the whole spec is checked before any tensor is drawn
    names, fingerprint = _base_layers(base, spec)
    if spec.kind == "random":
        raw = DirectionSpec("random", spec.layers, seed=spec.seed, base_fingerprint=fingerprint)
        drawn = _gaussian(base.model, names, raw, streamed)
    else:
        drawn = displacement_direction(base, spec.source, spec.layers, streamed=streamed)
        if spec.content_hash and drawn.spec.content_hash != spec.content_hash:
            raise DirectionError(_replaced(spec, drawn.spec.content_hash))
    direction = normalize(base, drawn, spec.normalization)
    if spec.orthogonal_to is not None:
        direction = orthogonalize(direction, regenerate(base, spec.orthogonal_to, streamed=streamed))
    return direction.unit() if spec.unit_norm else direction


def _replaced(spec: DirectionSpec, found: str) -> str:
    return (f"the saved result {spec.source} is not the one direction [{spec.describe()}] was made from: "
            f"its tensors have sha256 {found[:16]}, the direction recorded {spec.content_hash[:16]} (the "
            f"result was replaced or changed since); use the result it was made from, or start a new run")


def _gaussian(model: nn.Module, names: Sequence[str], spec: DirectionSpec, streamed: bool) -> Direction:
    weights = {n: layer_weight(model, n) for n in names}
    shapes = {n: (tuple(w.shape), w.device, w.dtype) for n, w in weights.items()}

    def layer(name: str) -> torch.Tensor:
        shape, device, dtype = shapes[name]
        generator = torch.Generator().manual_seed(_layer_seed(spec.seed, name))
        out = torch.empty(shape, dtype=dtype)  # (out, in), on CPU
        # drawn in float32 a block of rows at a time from one stream: the numbers of one draw of the whole
        # layer (tests/test_row_blocks.py), without the layer's float32 copy
        for block in row_blocks(out):
            block.copy_(torch.randn(block.shape, generator=generator, dtype=torch.float32))
        return out.to(device)

    return Direction(_layerwise(names, layer, streamed), spec)


def _layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one layer of a random direction, from (seed, layer name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1
