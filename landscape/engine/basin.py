"""The attractive basin around w0: its radius R(w0) along directions, and statistics over many directions.

Along a direction ``u`` (rescaled to unit Euclidean norm over its layers), the radial profile is
``f(r) = NLL(w0 + r u / ||u||)``, so ``r`` is the Euclidean norm of the displacement over the chosen
layers (the same units as ``||w_q - w0||`` of a quantized model). The basin radius along ``u`` is the
smallest ``r`` with ``f(r) > level``, where ``level = f(0) + threshold`` (absolute, nats) or
``f(0) + threshold * |f(0)|`` (relative). It is found by bracketing (doubling the radius from
``initial_fraction * ||w0||``, or halving it when that is already above the level) and bisection until
the bracket ``(lower, upper]`` satisfies ``upper - lower <= tolerance * upper``; ``radius`` is the
bracket's midpoint. The search assumes the profile crosses the level once inside the bracket it finds
(the recorded samples show whether it does). A NaN value counts as above the level.

``||w0||`` is the Euclidean norm of the pretrained weights over the same layers; ``radius / ||w0||`` is
the relative radius that compares models of different sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from landscape.data import TokenSet
from landscape.engine.directions import (
    Direction,
    DirectionError,
    DirectionSpec,
    check_direction,
    check_spec,
    displacement_direction,
    eigenvector_direction,
    layer_weight,
    regenerate,
)
from landscape.engine.perturb import (
    NLLObjective,
    Objective,
    Perturbation,
    check_objective_data,
    forward_only,
    holds_layer_by_layer,
    nll_convention,
    output_names,
)
from landscape.engine.sweep import Execution
from landscape.quant.result import result_stem, saved_tensors_sha256, tensors_sha256
from landscape.store import StoreData, finish_run, model_provenance, read_store, start_run, with_shard
from landscape.weights import Base, as_base, weights_norm

DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)


MIN_TOLERANCE = 1e-9  # a bracket relative width float64 bisection reaches in about 30 halvings


@dataclass(frozen=True)
class RadiusSearch:
    """Settings of the radius search (radii in units of ``||w0||`` over the direction's layers).

    Attributes:
        threshold: rise of the objective that leaves the basin (nats for NLL; a fraction of ``|f(0)|`` if
            relative).
        relative: interpret ``threshold`` relative to ``|f(0)|``.
        tolerance: stop when ``upper - lower <= tolerance * upper`` (relative width of the final bracket).
        initial_fraction: first radius tried, as a fraction of ``||w0||``.
        min_fraction: below this radius (fraction of ``||w0||``) halving stops: R is reported in (0, that].
        max_fraction: beyond this radius doubling stops: R is reported as ``inf`` (not found).
        value_name: the output of the objective whose rise leaves the basin (``nll`` for the default
            objective).
    """

    threshold: float = 0.1
    relative: bool = False
    tolerance: float = 0.01
    initial_fraction: float = 0.01
    min_fraction: float = 1e-6
    max_fraction: float = 10.0
    value_name: str = "nll"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a finite number > 0, got {self.threshold!r}")
        if not MIN_TOLERANCE <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [{MIN_TOLERANCE:g}, 1) (relative width of the final "
                             f"bracket; below {MIN_TOLERANCE:g} float64 radii cannot halve it), "
                             f"got {self.tolerance!r}")
        if not 0 < self.min_fraction <= self.initial_fraction <= self.max_fraction < math.inf:
            raise ValueError(f"need 0 < min_fraction <= initial_fraction <= max_fraction < inf, got "
                             f"{self.min_fraction}, {self.initial_fraction}, {self.max_fraction}")

    def bracket_settings(self) -> dict[str, Any]:
        """The settings of the bracketing and bisection (what a store records as ``search``; ``value_name`` is
        recorded beside it)."""
        return {k: v for k, v in asdict(self).items() if k != "value_name"}

    def level(self, center_value: float) -> float:
        """The value whose crossing leaves the basin."""
        return center_value + (self.threshold * abs(center_value) if self.relative else self.threshold)

    @property
    def max_evaluations(self) -> int:
        """Upper bound on the objective evaluations of one search, the center ``r = 0`` included."""
        bracketing = max(math.ceil(math.log2(self.max_fraction / self.initial_fraction)),
                         math.ceil(math.log2(self.initial_fraction / self.min_fraction)) + 1) + 1
        return 1 + bracketing + math.ceil(math.log2(1 / self.tolerance)) + 1


@dataclass(frozen=True)
class RadialProfile:
    """Objective values at radii ``r`` along a unit direction (``r`` = Euclidean norm of the displacement)."""

    radii: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class BasinRadius:
    """The basin radius along one direction.

    Attributes:
        radius: estimate of R (midpoint of the bracket; ``inf`` if no crossing up to
            ``max_fraction * ||w0||``).
        lower, upper: R lies in ``(lower, upper]`` (``upper`` is ``inf`` if not found).
        center_value: the objective at w0 (NLL in nats/token by default).
        level: the value whose crossing defines R.
        weights_norm: ``||w0||`` over the direction's layers.
        samples: every radius the search evaluated (including 0), sorted, with its value.
        direction: the direction's spec.
    """

    radius: float
    lower: float
    upper: float
    center_value: float
    level: float
    weights_norm: float
    samples: RadialProfile
    direction: DirectionSpec

    @property
    def relative_radius(self) -> float:
        """``radius / ||w0||``."""
        return self.radius / self.weights_norm

    @property
    def found(self) -> bool:
        return math.isfinite(self.radius)


def bracket_crossing(value_at: Callable[[float], float], level: float, initial: float, minimum: float,
                     maximum: float, tolerance: float) -> tuple[float, float]:
    """Bracket and bisect the first ``r > 0`` where ``value_at(r) > level`` (NaN counts as above).

    Doubles from ``initial`` up to ``maximum`` (or halves down to ``minimum`` if ``initial`` is already
    above), then bisects until ``upper - lower <= tolerance * upper``. Returns ``(lower, upper)`` with the
    crossing in ``(lower, upper]``; ``upper = inf`` if no radius up to ``maximum`` is above the level, and
    ``lower = 0`` if even ``minimum`` is.
    """

    def above(r: float) -> bool:
        return not value_at(r) <= level

    if above(initial):
        lower, upper = initial / 2, initial
        while above(lower):
            if lower / 2 < minimum:
                return 0.0, lower
            lower, upper = lower / 2, lower
    else:
        lower, upper = initial, min(2 * initial, maximum)
        while not above(upper):
            if upper >= maximum:
                return upper, math.inf
            lower, upper = upper, min(2 * upper, maximum)
    while upper - lower > tolerance * upper:
        middle = (lower + upper) / 2
        if above(middle):
            upper = middle
        else:
            lower = middle
    return lower, upper


def basin_radius(model: nn.Module | Base, direction: Direction, objective: Objective | None = None, *,
                 data: TokenSet | None = None, search: RadiusSearch = RadiusSearch(),
                 center_value: float | None = None) -> BasinRadius:
    """The basin radius R along ``direction`` (rescaled to unit norm), see the module docstring.

    Args:
        objective: what is measured (default: NLL on ``data``, batches of 8); ``search.value_name`` picks its
            output.
        center_value: the objective at w0 if already known (saves one evaluation).
    """
    base = as_base(model)
    objective = objective or NLLObjective(_require(data), model_name=base.label)
    value_name = search.value_name
    unit = direction.unit()
    with Perturbation(base, [unit], streamed=holds_layer_by_layer([unit], [objective])) as perturbation:
        _check_value_name(objective, perturbation.layers, value_name)
        samples: dict[float, float] = {}

        def value_at(r: float) -> float:
            samples[r] = perturbation.measure([r], [objective])[value_name]
            return samples[r]

        center = value_at(0.0) if center_value is None else samples.setdefault(0.0, float(center_value))
        norm0 = weights_norm(base.model, perturbation.layers)
        level = search.level(center)
        lower, upper = bracket_crossing(value_at, level, search.initial_fraction * norm0,
                                        search.min_fraction * norm0, search.max_fraction * norm0,
                                        search.tolerance)
    radii = np.array(sorted(samples))
    profile = RadialProfile(radii, np.array([samples[r] for r in radii]))
    radius = (lower + upper) / 2 if math.isfinite(upper) else math.inf
    return BasinRadius(radius, lower, upper, center, level, norm0, profile, direction.spec)


def radial_profile(model: nn.Module | Base, direction: Direction, radii: Sequence[float] | np.ndarray,
                   objective: Objective | None = None, *, data: TokenSet | None = None,
                   value_name: str = "nll") -> RadialProfile:
    """The objective (its output ``value_name``; default: NLL on ``data``, batches of 8) at
    ``w0 + r u / ||u||`` for each radius ``r`` (Euclidean norm of the displacement)."""
    base = as_base(model)
    objective = objective or NLLObjective(_require(data), model_name=base.label)
    radii = _check_radii(radii)
    unit = direction.unit()
    with Perturbation(base, [unit], streamed=holds_layer_by_layer([unit], [objective])) as perturbation:
        _check_value_name(objective, perturbation.layers, value_name)
        values = [perturbation.measure([r], [objective])[value_name] for r in radii]
    return RadialProfile(radii, np.array(values))


def displacement_norms(model: nn.Module | Base, results: Mapping[str, Any],
                       layers: Sequence[str] = ("*",)) -> dict[str, float]:
    """``||w_q - w0||`` of each quantized model over the layers matching ``layers`` (layers a result did not
    quantize count as zero), in the units of R(w0).

    Args:
        results: label -> :class:`~landscape.quant.result.QuantResult` or the path it was saved to.
    """
    return {label: displacement_direction(model, result, layers, streamed=True).norm()
            for label, result in results.items()}


@dataclass(frozen=True)
class BasinStatistics:
    """Basin radii along many directions, their profiles, and quantized displacements in the same units.

    Attributes:
        per_direction: the search result along each direction.
        weights_norm: ``||w0||`` over the directions' layers (all directions cover the same layers).
        center_value: the objective at w0; ``level``: the value whose crossing defines R.
        search: the search settings.
        profile_radii: radii of the regular radial profile (empty if none was asked for).
        profile_values: ``(n_directions, n_radii)`` objective values on ``profile_radii``.
        displacement_norms: label -> ``||w_q - w0||`` over the same layers.
        provenance: model, fingerprints, data, NLL convention, direction specs, settings, code version.
    """

    per_direction: tuple[BasinRadius, ...]
    weights_norm: float
    center_value: float
    level: float
    search: RadiusSearch
    profile_radii: np.ndarray
    profile_values: np.ndarray
    displacement_norms: dict[str, float]
    provenance: dict[str, Any]

    @property
    def radii(self) -> np.ndarray:
        """R along each random direction, the "most-case" sample (``inf`` where no crossing was found); every
        direction when none is random. The other directions' radii are :meth:`along`."""
        random = [b.radius for b in self.per_direction if b.direction.kind == "random"]
        return np.array(random or [b.radius for b in self.per_direction])

    @property
    def relative_radii(self) -> np.ndarray:
        return self.radii / self.weights_norm

    @property
    def median(self) -> float:
        """The median of :attr:`radii`: R(w0), the most-case radius."""
        return quantile(self.radii, 0.5)

    def quantiles(self, levels: Sequence[float] = DEFAULT_QUANTILES,
                  relative: bool = False) -> dict[float, float]:
        """Quantiles of :attr:`radii` (see :func:`quantile`), absolute or relative to ``||w0||``."""
        radii = self.relative_radii if relative else self.radii
        return {float(q): quantile(radii, q) for q in levels}

    def along(self) -> dict[str, float]:
        """R along each direction that is not random (Hessian eigenvectors, normalised displacements), by
        :func:`direction_label`: the worst-case side of the basin, in the units of :attr:`radii`."""
        return {direction_label(b.direction): b.radius for b in self.per_direction
                if b.direction.kind != "random"}

    def worst_to_most_case(self) -> float:
        """The smallest R along a Hessian eigenvector (either sign) over the median R along random directions
        (NaN without eigenvector directions): how much narrower the basin is in its sharpest direction."""
        sharp = [b.radius for b in self.per_direction if b.direction.kind == "eigenvector"]
        return min(sharp) / self.median if sharp else math.nan

    def displacement_to_radius(self) -> dict[str, float]:
        """Each quantized displacement's norm divided by the median R: above 1 means outside the basin."""
        return {label: norm / self.median for label, norm in self.displacement_norms.items()}

    @classmethod
    def from_store(cls, path: str | Path) -> BasinStatistics:
        """Read a finished run of :func:`basin_statistics`."""
        return cls.from_data(read_store(path), Path(path))

    @classmethod
    def from_data(cls, data: StoreData, path: Path | None = None) -> BasinStatistics:
        """The statistics held in a finished basin-radius store's contents."""
        prov, a = data.provenance, data.arrays
        if prov.get("kind") != "basin_radius":
            raise ValueError(f"{path or 'the data'} holds a {prov.get('kind')!r} run, not a basin-radius run")
        if not data.complete:
            raise ValueError(f"{path or 'the data'} is unfinished "
                             f"({int(data.done.sum())} of {data.done.size} directions): resume it")
        specs = [DirectionSpec.from_dict(s) for s in prov["directions"]]
        norm0, center, level = float(a["weights_norm"]), float(a["center_value"]), float(a["level"])
        per_direction = []
        for i, spec in enumerate(specs):
            evaluated = np.isfinite(a["search_radius"][i])  # the rest is padding
            samples = RadialProfile(a["search_radius"][i][evaluated], a["search_value"][i][evaluated])
            per_direction.append(BasinRadius(float(a["radius"][i]), float(a["lower"][i]),
                                             float(a["upper"][i]), center, level, norm0, samples, spec))
        table = data.table("displacements") if "displacements/label" in a else {"label": [], "norm": []}
        search = RadiusSearch(**prov["search"], value_name=prov.get("value_name", "nll"))
        return cls(tuple(per_direction), norm0, center, level, search,
                   a["profile_radii"], a.get("profile_value", np.empty((len(specs), 0))),
                   {str(k): float(v) for k, v in zip(table["label"], table["norm"])}, prov)


def basin_statistics(
    model: nn.Module | Base,
    directions: Sequence[Direction | DirectionSpec],
    objective: Objective | None = None,
    *,
    data: TokenSet | None = None,
    search: RadiusSearch = RadiusSearch(),
    profile_radii: Sequence[float] | np.ndarray = (),
    quant_results: Mapping[str, Any] | None = None,
    execution: Execution = Execution(),
) -> BasinStatistics | None:
    """Basin radius along each direction, an optional regular radial profile, and quantized displacements.

    Args:
        directions: Directions, or specs (regenerated one at a time, so many large directions never sit in
            memory together; streamed, a layer at a time, with ``execution.low_memory`` and a forward-only
            objective such as the NLL); all must cover the same layers.
        objective: what is measured (default: NLL on ``data``, batches of 8); ``search.value_name`` picks its
            output.
        search: the threshold and the bracketing of each search.
        profile_radii: radii (absolute, Euclidean norm of the displacement) where every direction's
            profile is also evaluated, for plotting.
        quant_results: label -> QuantResult (or its path) whose ``||w_q - w0||`` is reported in the same
            units.
        execution: the store (one point per direction, flushed as it finishes, resumable), extra provenance,
            progress bar, and shard ``(i, n)``: only directions ``i, i + n, ...`` are searched, into a store
            that :func:`landscape.store.merge_stores` joins with the other shards'; a shard returns ``None``
            (read the merged store with :meth:`BasinStatistics.from_store`).

    Raises:
        ValueError: bad directions, settings, results or store, before any evaluation.
    """
    if not directions:
        raise ValueError("basin_statistics needs at least one direction")
    execution.check_store()
    base = as_base(model)
    model = base.model
    value_name = search.value_name
    objective = objective or NLLObjective(_require(data), model_name=base.label)
    check_objective_data(model, [objective])
    profile = _check_radii(profile_radii) if len(profile_radii) else np.empty(0)
    layer_sets = []
    for d in directions:
        if isinstance(d, Direction):
            check_direction(base, d)
        layer_sets.append(d.names if isinstance(d, Direction) else check_spec(base, d))
    layers = layer_sets[0]
    if any(set(s) != set(layers) for s in layer_sets):
        raise DirectionError("all directions of a basin-radius run must cover the same layers (R is compared "
                             "with ||w0|| over those layers)")
    _check_value_name(objective, layers, value_name)
    norms = displacement_norms(base, quant_results or {}, layers)
    specs = [d.spec if isinstance(d, Direction) else d for d in directions]
    norm0 = weights_norm(model, layers)
    n_max = search.max_evaluations
    run_provenance = with_shard({
        "kind": "basin_radius",
        **model_provenance(base),
        "directions": [s.to_dict() for s in specs],
        "search": search.bracket_settings(),
        "value_name": value_name,
        "objective": objective.provenance(),
        "nll_convention": nll_convention([objective]),
        "data": data.provenance() if data is not None else None,
        "profile_radii": profile.tolist(),
        "quantized": {label: _describe_result(r) for label, r in (quant_results or {}).items()},
        "units": "radii: Euclidean norm of the displacement over the directions' layers",
        **dict(execution.provenance),
    }, execution.shard)
    arrays = {"radius": ((), np.float64), "lower": ((), np.float64), "upper": ((), np.float64),
              "search_radius": ((n_max,), np.float64), "search_value": ((n_max,), np.float64)}
    if profile.size:
        arrays["profile_value"] = ((profile.size,), np.float64)
    w0 = {n: layer_weight(model, n).detach() for n in layers}  # the model is at w0: views, read-only
    streamed = execution.low_memory and forward_only(objective)
    center = float(objective(model, w0)[value_name])
    level = search.level(center)
    with start_run(execution.store, run_provenance, arrays, (len(specs),), execution.resume) as record:
        if record.writable:
            record.write_array("weights_norm", norm0)
            record.write_array("center_value", center)
            record.write_array("level", level)
            record.write_array("profile_radii", profile)
            if norms:
                record.write_table("displacements", {"label": list(norms), "norm": list(norms.values()),
                                                     "relative_norm": [v / norm0 for v in norms.values()]})
        todo = ~record.done & execution.mine((len(specs),))
        for i in execution.progress_bar(np.flatnonzero(todo), "basin radius"):
            d = directions[i]
            direction = d if isinstance(d, Direction) else regenerate(base, d, streamed=streamed)
            found = basin_radius(base, direction, objective, search=search, center_value=center)
            point = {"radius": found.radius, "lower": found.lower, "upper": found.upper,
                     "search_radius": _padded(found.samples.radii, n_max),
                     "search_value": _padded(found.samples.values, n_max)}
            if profile.size:
                point["profile_value"] = radial_profile(base, direction, profile, objective,
                                                        value_name=value_name).values
            record.write_point(int(i), point)
        stored, path = finish_run(record)
    return BasinStatistics.from_data(stored, path) if execution.shard == (0, 1) else None


def direction_label(spec: DirectionSpec) -> str:
    """A short name of a non-random direction: an eigenvector's ``source`` (``+v1 (top Hessian eigenvector
    1, ...)``), ``displacement to <result file name>``."""
    if spec.kind == "displacement":
        return f"displacement to {Path(spec.source).name or 'an unsaved result'}"
    return spec.source or spec.describe()


def eigenvector_directions(model: nn.Module | Base, top: Any, data_label: str = "") -> list[Direction]:
    """Both signs of each top Hessian eigenvector of ``top`` (:class:`~landscape.curvature.Eigenpairs` with
    eigenvectors) as directions for :func:`basin_statistics`: an eigenvector's sign is arbitrary and,
    away from a minimum, the basin is not symmetric along it. Labelled ``+v1 (lambda = ...)``."""
    out = []
    for i, value in enumerate(top.eigenvalues):
        vector = top.direction(i)
        for sign, mark in ((1.0, "+"), (-1.0, "-")):
            out.append(eigenvector_direction(
                model, {n: sign * t for n, t in vector.items()},
                f"{mark}v{i + 1} (top Hessian eigenvector {i + 1}, lambda = {value:.4g}{data_label})"))
    return out


# --------------------------------------------------------------------------------------------- helpers
def quantile(values: np.ndarray, level: float) -> float:
    """The ``level`` quantile with linear interpolation between order statistics (numpy's default), where a
    radius not found (``inf``) stays ``inf`` instead of turning NaN between two infinite neighbours."""
    if not 0 <= level <= 1:
        raise ValueError(f"quantile level must be in [0, 1], got {level!r}")
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    position = level * (len(ordered) - 1)
    below, above = ordered[math.floor(position)], ordered[math.ceil(position)]
    return float(below if below == above else below + (above - below) * (position - math.floor(position)))


def _require(data: TokenSet | None) -> TokenSet:
    if data is None:
        raise ValueError("pass data (a TokenSet) for the default NLL objective, or an objective")
    return data


def _check_value_name(objective: Objective, layers: Sequence[str], value_name: str) -> None:
    names = output_names([objective], layers)
    if value_name not in names:
        raise ValueError(f"value_name {value_name!r} is not an output of the objective; "
                         f"its outputs: {list(names)[:5]}")


def _check_radii(radii: Sequence[float] | np.ndarray) -> np.ndarray:
    radii = np.asarray(radii, dtype=np.float64)
    if radii.ndim != 1 or not np.isfinite(radii).all() or (radii < 0).any():
        raise ValueError(f"radii must be a 1-D sequence of finite numbers >= 0, got {radii.tolist()}")
    return radii


def _padded(values: np.ndarray, length: int) -> np.ndarray:
    out = np.full(length, np.nan)
    out[: len(values)] = values
    return out


def _describe_result(result: Any) -> dict[str, Any]:
    """A result whose displacement norm a radius run reports, by path or label and by the sha256 of its
    tensors (a resume after the file was replaced is refused)."""
    if isinstance(result, (str, Path)):
        return {"path": str(result), "sha256": saved_tensors_sha256(result_stem(result))}
    return {"label": result.label, "base_model": result.base_model,
            "base_fingerprint": result.base_fingerprint, "sha256": tensors_sha256(result.weights)}
