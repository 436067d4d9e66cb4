"""Displacement analysis of quantized models of one base model: where each quantizer moved w0, and what it
cost.

For quantized models ``w_q`` of the same pretrained weights ``w0`` (RTN, GPTQ, QAFT, LoRC..., at several
formats) :func:`compare_displacements` measures, for every displacement ``d = w_q - w0``:

* **size**: ``||d||`` and ``||d|| / ||w0||``, in total and per layer;
* **direction**: pairwise cosines ``<d_a, d_b> / (||d_a|| ||d_b||)`` and the coefficients ``<d, v_i>`` on
  unit Hessian eigenvectors ``v_i`` (e.g. :meth:`landscape.curvature.Curvature.spectrum`), with the share
  ``sum_i <d, v_i>^2 / ||d||^2`` of the squared displacement they capture;
* **steepness**: the slope ``g^T u`` and the Rayleigh quotient ``u^T H u`` (``u = d / ||d||``) at points
  ``w0 + t d`` of the path (:meth:`landscape.curvature.Curvature.along`): at w0 every displacement looks
  flat in curvature, differences show along the path; the slope at w0 is the first-order part of the cost;
* **cost**: token-mean NLL (nats/token, with a bootstrap interval over segments) at each endpoint, along
  the straight path ``w0 + t (w_q - w0)`` and along the segment between two endpoints (default: every
  GPTQ and QAFT pair of the same format), and each layer's output MSE ``mean((x d^T)^2)`` on the inputs
  of the full-precision model (:func:`landscape.objectives.layer_mse`), summed and per layer.

Conventions: norms, dot products and cosines are Euclidean over every entry of the ``(out, in)`` weights
of the compared layers (the union of the results' layers; a layer a result did not quantize has zero
displacement), computed in float64. Path points are ``torch.lerp(a, b, t)``, exact at ``t = 0`` (``a``)
and ``t = 1`` (``b``), so the path NLL at ``t = 0`` is NLL(w0) and at ``t = 1`` the endpoint's NLL.
A result is grouped under its format's name; a full-precision control (``fp-finetune``, no format) under
the format it was paired with (``settings["format"]``), else under ``"none"``.

Every result must come from this model's w0 (its ``base_fingerprint`` equals
:func:`~landscape.models.weights_fingerprint` of the model on its layers); that and every other argument
is checked before any evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.curvature import (
    Curvature,
    CurvatureError,
    Eigenpairs,
    Spectrum,
    check_curvature_model,
    direction_space,
)
from landscape.data import TokenSet
from landscape.engine.directions import Direction
from landscape.objectives import NLLResult, layer_mse, nll
from landscape.quant.result import QuantResult, ResultMismatchError
from landscape.stats import (
    DEFAULT_RESAMPLES,
    StatsError,
    check_interval_settings,
    control_gaps,
    nll_interval,
)
from landscape.store import model_provenance
from landscape.studies.comparison import Comparison, ComparisonError, DisplacementMeasures, SegmentProfile
from landscape.weights import (
    Base,
    as_base,
    get_layer,
    quantizable_layers,
    swapped_weights,
    weight_matrix,
)

# Eigenvectors to project on: a Spectrum (its top pairs), Eigenpairs, or a sequence of directions (a
# landscape.engine.directions.Direction or a mapping layer name -> (out, in) tensor).
EigenBasis = Spectrum | Eigenpairs | Sequence[Direction | Mapping[str, torch.Tensor]]
DEFAULT_PATH_T: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_CURVATURE_T: tuple[float, ...] = (0.0, 0.5, 1.0)
NO_FORMAT = "none"


def _coordinates(t: Sequence[float], name: str, allow_empty: bool) -> np.ndarray:
    try:
        points = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise ComparisonError(f"{name} must be a sequence of numbers, got {t!r}") from None
    if points.ndim != 1 or (points.size == 0 and not allow_empty) or not np.isfinite(points).all():
        raise ComparisonError(f"{name} must be a {'possibly empty' if allow_empty else 'non-empty'} 1-D "
                              f"sequence of finite path coordinates (0 = w0, 1 = the endpoint), got "
                              f"{list(np.atleast_1d(points))}")
    return points


@dataclass(frozen=True)
class ComparisonSettings:
    """What a comparison measures along each displacement and how its intervals are made.

    Attributes:
        path_t: coordinates ``t`` of the NLL along ``w0 + t d`` (and of the segments between endpoints).
        curvature_t: coordinates of the slope and Rayleigh quotient along the path; ``()`` skips the
            curvature.
        between: pairs of labels whose endpoints are joined by a segment, or ``"gptq-qaft"``: every pair of a
            ``gptq`` and a ``qaft`` result in the same format group.
        level, n_resamples, seed: bootstrap intervals (NLL over segments, curvature over batches).
        batch_size: segments per forward pass (memory only; each path point's curvature costs one product per
            batch).
    """

    path_t: Sequence[float] = DEFAULT_PATH_T
    curvature_t: Sequence[float] = DEFAULT_CURVATURE_T
    between: Sequence[tuple[str, str]] | Literal["gptq-qaft"] = "gptq-qaft"
    level: float = 0.95
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "path_t", _coordinates(self.path_t, "path_t", allow_empty=False))
        object.__setattr__(self, "curvature_t",
                           _coordinates(self.curvature_t, "curvature_t", allow_empty=True))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ComparisonError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        try:
            check_interval_settings(self.level, self.n_resamples)
        except StatsError as err:
            raise ComparisonError(str(err)) from None


# ------------------------------------------------------------------------------------ the analysis
def compare_displacements(
    model: nn.Module | Base,
    results: Mapping[str, QuantResult] | Sequence[QuantResult],
    data: TokenSet,
    *,
    mse_data: TokenSet | None = None,
    curvature_data: TokenSet | None = None,
    eigenvectors: EigenBasis | None = None,
    settings: ComparisonSettings = ComparisonSettings(),
    progress: bool = True,
) -> Comparison:
    """Compare the displacements ``w_q - w0`` of quantized models of ``model`` (see the module docstring).

    Args:
        model: the base model at w0, or its :class:`~landscape.weights.Base` (whose label names it in the
            report); left bit-exactly at w0.
        results: label -> :class:`QuantResult`, or results labelled by ``result.label`` (must be unique).
        data: held-out segments for every NLL (token-mean, nats/token; >= 2 segments for the interval).
        mse_data: inputs of the layer MSE (default ``data``); e.g. the calibration set.
        curvature_data: data of the Hessian-vector products (default ``data``).
        eigenvectors: directions to project the displacements on, e.g. a
            :meth:`~landscape.curvature.Curvature.spectrum` result (its top pairs); ``None`` for none.
            Each is rescaled to unit norm; a Direction made on other base weights is refused.
        settings: path and curvature coordinates, segments between endpoints, intervals, batch size.
        progress: a progress bar over the results.

    Raises:
        ComparisonError (a ValueError): results of another base, unknown layers or labels, bad settings or
            eigenvectors; all before any evaluation.
    """
    base = as_base(model)
    model = base.model
    labelled = labelled_results(results)
    layers = check_same_base(base, labelled)
    path_points, curvature_points = settings.path_t, settings.curvature_t
    batch_size, level, n_resamples, seed = (settings.batch_size, settings.level, settings.n_resamples,
                                            settings.seed)
    mse_data, curvature_data = mse_data or data, curvature_data or data
    for name, value in (("data", data), ("mse_data", mse_data), ("curvature_data", curvature_data)):
        if not isinstance(value, TokenSet):
            raise ComparisonError(f"{name} must be a landscape.data.TokenSet, got {type(value).__name__}")
    if data.n_segments < 2:
        raise ComparisonError(f"data has {data.n_segments} segment; the NLL interval needs >= 2 segments")
    if len(curvature_points):
        try:  # checked before any work: the curvature along the path needs eval mode and eager attention
            check_curvature_model(model)
        except CurvatureError as err:
            raise ComparisonError(f"{err} (or pass curvature_t=() to skip the curvature)") from None
    eigenvalues, basis = eigen_basis(model, eigenvectors)
    pairs = _pairs(labelled, settings.between)
    name = base.label
    n_curvature_batches = -(-curvature_data.n_segments // batch_size)
    curvature_level = level if n_curvature_batches >= 2 else None
    interval_args = {"level": level, "n_resamples": n_resamples, "seed": seed}

    w0 = {n: weight_matrix(get_layer(model, n)).detach().clone() for n in layers}
    endpoints = {label: _endpoint(result, w0) for label, result in labelled.items()}
    geometry = _geometry(w0, endpoints, basis)
    center = _nll(model, {}, data, batch_size, name)
    endpoint_nll: dict[str, NLLResult] = {}
    rows = []
    for i, (label, result) in enumerate(tqdm(labelled.items(), desc="compare", disable=not progress)):
        endpoint_nll[label] = _nll(model, endpoints[label], data, batch_size, name)
        known = {0.0: center.value, 1.0: endpoint_nll[label].value}
        path_nll = _segment_nll(model, w0, endpoints[label], path_points, known, data, batch_size, name)
        steepness = _path_curvature(model, curvature_data, w0, endpoints[label], curvature_points,
                                    curvature_level, n_resamples, seed, batch_size)
        mse = layer_mse(model, mse_data, endpoints[label], inputs="reference", batch_size=batch_size)
        layer_norms = {n: math.sqrt(geometry.layer_sq[i, j]) for j, n in enumerate(layers)}
        rows.append(DisplacementMeasures(
            label, result.method, format_group(result), math.sqrt(geometry.gram[i, i]),
            math.sqrt(geometry.gram[i, i]) / geometry.w0_norm, layer_norms,
            {n: layer_norms[n] / geometry.layer_w0_norms[n] for n in layers},
            {n: float(mse[n]) for n in layers}, nll_interval(endpoint_nll[label], **interval_args), path_nll,
            *steepness[:3], geometry.projections[i], *steepness[3:]))
    labels = list(labelled)
    segments = []
    for start, end in pairs:
        i, j = labels.index(start), labels.index(end)
        known = {0.0: endpoint_nll[start].value, 1.0: endpoint_nll[end].value}
        distance = math.sqrt(max(geometry.gram[i, i] + geometry.gram[j, j] - 2 * geometry.gram[i, j], 0.0))
        segments.append(SegmentProfile(start, end, distance, path_points, _segment_nll(
            model, endpoints[start], endpoints[end], path_points, known, data, batch_size, name)))
    control_adjusted = [{"format": g.format, "corpus": g.corpus, "sentence": g.sentence(),
                         **{k: [getattr(g, k).value, getattr(g, k).low, getattr(g, k).high]
                            for k in ("advantage", "adaptation", "remaining")}}
                        for g in control_gaps([(r.method, format_group(r),
                                                endpoint_nll[label].segment_nll_sum)
                                               for label, r in labelled.items()], center.segment_nll_sum,
                                              center.segment_tokens, center.convention.corpus,
                                              **interval_args)]
    provenance = {
        **model_provenance(base),
        "model_fingerprint": base.fingerprint(layers),
        "control_adjusted": control_adjusted,
        "data": data.provenance(),
        "nll_convention": center.convention.to_dict(),
        "mse_data": mse_data.provenance(),
        "mse_inputs": "full-precision model (reference)",
        "curvature_data": curvature_data.provenance(),
        "curvature_level": curvature_level,
        "eigenvectors": _basis_source(eigenvectors),
        "settings": {"batch_size": batch_size, "seed": seed, "between": [list(p) for p in pairs]},
        "results": {label: _describe(result) for label, result in labelled.items()},
        "units": "norms: Euclidean over the (out, in) weights of the compared layers; NLL: nats/token; "
                 "curvature: nats/token per squared weight unit",
    }
    return Comparison(name, geometry.w0_norm, tuple(layers), geometry.layer_w0_norms,
                      nll_interval(center, **interval_args), tuple(rows), geometry.cosines, path_points,
                      curvature_points, eigenvalues, tuple(segments), provenance)


# ------------------------------------------------------------------------------------- validation
def labelled_results(results: Mapping[str, QuantResult] | Sequence[QuantResult]) -> dict[str, QuantResult]:
    """``label -> QuantResult`` from a mapping, or from a sequence labelled by ``result.label`` (unique
    labels)."""
    if isinstance(results, Mapping):
        labelled = dict(results)
    elif isinstance(results, Sequence) and not isinstance(results, str):
        labels = [getattr(r, "label", None) for r in results]
        duplicates = sorted({x for x in labels if labels.count(x) > 1}, key=str)
        if duplicates:
            raise ComparisonError(f"results share the labels {duplicates}: pass a mapping label "
                                  f"-> QuantResult")
        labelled = dict(zip(labels, results))
    else:
        raise ComparisonError(f"results must be a mapping label -> QuantResult or a sequence of "
                              f"QuantResults, got {type(results).__name__}")
    if not labelled:
        raise ComparisonError("need at least one quantized model to compare")
    for label, result in labelled.items():
        if not isinstance(label, str) or not label:
            raise ComparisonError(f"labels must be non-empty strings, got {label!r}")
        if not isinstance(result, QuantResult):
            raise ComparisonError(f"result {label!r} is a {type(result).__name__}, not a QuantResult")
        if not result.weights:
            raise ComparisonError(f"result {label!r} has no layers")
    return labelled


def check_same_base(model: nn.Module | Base, results: Mapping[str, QuantResult]) -> list[str]:
    """The union of the results' layers (forward order), after checking every result against ``model``.

    Raises:
        ComparisonError: a layer the model does not have, a weight of the wrong shape, a result computed on
            other base weights (its ``base_fingerprint`` differs from :func:`weights_fingerprint` of this
            model on the result's layers), or weights off the grid the result states
            (:meth:`QuantResult.check_grid`: never reported under a format it is not in).
    """
    base = as_base(model)
    available = quantizable_layers(base.model)
    for label, result in results.items():
        check_layers_and_base(base, f"result {label!r} ({result.label})", list(result.weights),
                              result.base_model, result.base_fingerprint)
        for n, w in result.weights.items():
            expected = tuple(weight_matrix(available[n]).shape)
            if tuple(w.shape) != expected:
                raise ComparisonError(f"result {label!r}: weight of {n!r} has shape {tuple(w.shape)}, the "
                                      f"layer's (out, in) weight is {expected}")
        try:
            result.check_grid(base, f"result {label!r}")
        except ResultMismatchError as err:
            raise ComparisonError(str(err)) from None
    used = {n for r in results.values() for n in r.weights}
    return [n for n in available if n in used]


def check_layers_and_base(model: nn.Module | Base, what: str, layers: Sequence[str], base_model: str,
                          base_fingerprint: str) -> None:
    """Raise :class:`ComparisonError` unless every one of ``layers`` is a quantizable layer of ``model`` and
    ``base_fingerprint`` (of the result described by ``what``) is :func:`weights_fingerprint` of ``model`` on
    them. Needs only a result's metadata, so saved results can be checked before any is loaded."""
    base = as_base(model)
    available = quantizable_layers(base.model)
    unknown = [n for n in layers if n not in available]
    if unknown:
        raise ComparisonError(f"{what} has layers this model does not have, e.g. {unknown[:3]}; "
                              f"its quantizable layers are e.g. {list(available)[:3]} "
                              f"({len(available)} in all)")
    actual = base.fingerprint(list(layers))
    if base_fingerprint != actual:
        raise ComparisonError(
            f"{what} was computed on base {base_model!r} with fingerprint {base_fingerprint or 'missing'}, "
            f"not on this model (fingerprint {actual} on its {len(layers)} layers): compare only quantized "
            f"models of the same w0")


def format_group(result: QuantResult) -> str:
    """The format a result is reported under: its format's name, else the format of the run it controls
    (``settings["format"]``, e.g. fp-finetune paired with QAFT), else ``"none"``."""
    if result.format is not None:
        return result.format.name
    paired = result.settings.get("format") if isinstance(result.settings, Mapping) else None
    return str(paired) if paired else NO_FORMAT


def eigen_basis(model: nn.Module,
                eigenvectors: EigenBasis | None) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """Eigenvalues (NaN where unknown) and unit-norm ``layer -> (out, in)`` float64 vectors, checked against
    ``model``.

    Raises:
        ComparisonError: an eigenvector over layers the model lacks, of the wrong shape, zero, non-finite,
            or a Direction made on other base weights.
    """
    if eigenvectors is None:
        return np.empty(0), []
    if isinstance(eigenvectors, Spectrum):
        eigenvectors = eigenvectors.top
    if isinstance(eigenvectors, Eigenpairs):
        if eigenvectors.eigenvectors is None:
            raise ComparisonError("the eigenpairs carry no eigenvectors (computed with "
                                  "return_eigenvectors=False)")
        values = np.asarray(eigenvectors.eigenvalues, dtype=np.float64)
        vectors = [eigenvectors.direction(i) for i in range(len(eigenvectors))]
    elif isinstance(eigenvectors, Sequence) and not isinstance(eigenvectors, str):
        vectors, values = list(eigenvectors), np.full(len(eigenvectors), math.nan)
    else:
        raise ComparisonError(f"eigenvectors must be a Spectrum, Eigenpairs or a sequence of directions, "
                              f"got {type(eigenvectors).__name__}")
    basis = []
    for i, vector in enumerate(vectors):
        try:
            space = direction_space(model, vector)
        except CurvatureError as err:
            raise ComparisonError(f"eigenvector {i}: {err}") from None
        tensors = getattr(vector, "tensors", vector)
        flat = {n: tensors[n].detach().double().cpu() for n in space.layers}
        length = math.sqrt(sum(float(t.pow(2).sum()) for t in flat.values()))
        basis.append({n: t / length for n, t in flat.items()})
    return values, basis


def _pairs(results: Mapping[str, QuantResult],
           between: Sequence[tuple[str, str]] | str) -> list[tuple[str, str]]:
    if between == "gptq-qaft":
        return [(a, b) for a, ra in results.items() for b, rb in results.items()
                if ra.method == "gptq" and rb.method == "qaft" and format_group(ra) == format_group(rb)]
    if isinstance(between, str) or not isinstance(between, Sequence):
        raise ComparisonError(f"between must be 'gptq-qaft' or a sequence of (start, end) label pairs, "
                              f"got {between!r}")
    pairs = []
    for pair in between:
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(x in results for x in pair)):
            raise ComparisonError(f"between pair {pair!r} must name two of the results' labels: "
                                  f"{list(results)}")
        pairs.append((pair[0], pair[1]))
    return pairs


# ----------------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class _Geometry:
    gram: np.ndarray  # (n, n) <d_a, d_b>
    layer_sq: np.ndarray  # (n, L) ||d_l||^2
    projections: np.ndarray  # (n, k) <d, v_i>
    w0_norm: float
    layer_w0_norms: dict[str, float]

    @property
    def cosines(self) -> np.ndarray:
        norms = np.sqrt(np.diag(self.gram))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.outer(norms, norms) > 0, self.gram / np.outer(norms, norms), np.nan)


def _geometry(w0: Mapping[str, torch.Tensor], endpoints: Mapping[str, Mapping[str, torch.Tensor]],
              basis: Sequence[Mapping[str, torch.Tensor]]) -> _Geometry:
    """Gram matrix, per-layer squared norms and eigenvector coefficients of the displacements, one layer at a
    time (float64; never more than one layer of every displacement in memory)."""
    n, layers = len(endpoints), list(w0)
    gram, layer_sq = np.zeros((n, n)), np.zeros((n, len(layers)))
    projections = np.zeros((n, len(basis)))
    w0_norms = {}
    for j, name in enumerate(layers):
        base = w0[name].double()
        # (n, out*in)
        d = torch.stack([w[name].double() - base for w in endpoints.values()]).reshape(n, -1).cpu()
        gram += (d @ d.T).numpy()
        layer_sq[:, j] = d.pow(2).sum(dim=1).numpy()
        w0_norms[name] = math.sqrt(float(base.pow(2).sum()))
        for i, vector in enumerate(basis):
            if name in vector:
                projections[:, i] += (d @ vector[name].reshape(-1)).numpy()
    w0_norm = math.sqrt(sum(v * v for v in w0_norms.values()))
    return _Geometry(gram, layer_sq, projections, w0_norm, w0_norms)


def _endpoint(result: QuantResult, w0: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The result's weights on every compared layer, in the model's dtype and device (w0 where it has
    none)."""
    return {n: result.weights[n].to(w) if n in result.weights else w for n, w in w0.items()}


def _nll(model: nn.Module, weights: Mapping[str, torch.Tensor], data: TokenSet, batch_size: int,
         name: str) -> NLLResult:
    with swapped_weights(model, weights):
        return nll(model, data, batch_size=batch_size, model_name=name)


def _segment_nll(model: nn.Module, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                 t: np.ndarray, known: Mapping[float, float], data: TokenSet, batch_size: int,
                 name: str) -> np.ndarray:
    """NLL at ``lerp(start, end, t)`` for each ``t``; values already ``known`` (at t = 0 and 1: the endpoints,
    where lerp is exact) are reused."""
    values = []
    for point in t:
        if float(point) in known:
            values.append(known[float(point)])
        else:
            weights = {n: torch.lerp(start[n], end[n], float(point)) for n in start}
            values.append(_nll(model, weights, data, batch_size, name).value)
    return np.array(values)


def _path_curvature(model: nn.Module, data: TokenSet, w0: Mapping[str, torch.Tensor],
                    endpoint: Mapping[str, torch.Tensor], t: np.ndarray, level: float | None,
                    n_resamples: int, seed: int, batch_size: int) -> tuple[np.ndarray, ...]:
    """Rayleigh quotient and slope of ``d = endpoint - w0`` at ``w0 + t d``: (curvature, its low, its high,
    slope, its low, its high)."""
    if len(t) == 0:
        return (np.empty(0),) * 6
    direction = {n: endpoint[n] - w0[n] for n in w0 if not torch.equal(endpoint[n], w0[n])}
    if not direction:  # the result equals w0: no direction to take a curvature along
        return (np.full(len(t), math.nan),) * 6
    curvature = Curvature(model, data, batch_size=batch_size, progress=False)
    path = curvature.along(direction, t, level=level, n_resamples=n_resamples, seed=seed, slope=True)
    return path.curvature, path.low, path.high, path.slope, path.slope_low, path.slope_high


def _basis_source(eigenvectors: Any) -> dict[str, Any] | None:
    if eigenvectors is None:
        return None
    settings = getattr(eigenvectors, "settings", None)
    if settings is not None:
        return {"kind": "spectrum", "operator": eigenvectors.operator, "layers": list(eigenvectors.layers),
                "eigenvalues": eigenvectors.top.eigenvalues.tolist(),
                "residuals": eigenvectors.top.residuals.tolist(),
                "converged": eigenvectors.top.converged.tolist(), "lanczos_steps": eigenvectors.lanczos_steps,
                "data": settings.get("data"), "seed": settings.get("seed")}
    return {"kind": type(eigenvectors).__name__, "count": len(eigenvectors)}


def _describe(result: QuantResult) -> dict[str, Any]:
    return {"label": result.label, "method": result.method,
            "format": result.format.name if result.format else None, "base_model": result.base_model,
            "base_fingerprint": result.base_fingerprint,
            "calibration_hash": result.calibration.get("data_hash"), "settings": result.settings,
            "layers": len(result.weights), "sha256": result.tensors_sha256()}
