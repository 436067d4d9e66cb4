"""Scans: objectives measured at ``w0 + a·u`` (1-D) and ``w0 + a·u + b·v`` (2-D) over a grid of coefficients.

The model is perturbed **in place**: :class:`Perturbation` saves a copy of w0 for the layers the
directions touch (never a copy of the model), writes ``w0 + sum_k c_k d_k`` into them for a point, and
after every point (and on any exception) copies the saved w0 back, so the weights are bit-identical to
w0 afterwards. Each point starts from the saved w0, so a point is a pure function of (model, direction
specs, coordinates, data): shards and resumed runs give bit-identical values.

Objectives are pluggable (:class:`Objective`): the default is :class:`NLLObjective` (token-mean NLL,
nats per scored token, :func:`landscape.objectives.nll`) over a :class:`~landscape.data.TokenSet`, plus
:class:`LayerMSEObjective` (each perturbed layer's output MSE against w0,
:func:`landscape.objectives.layer_mse`) on request; :class:`FunctionObjective` wraps any
``model -> float`` (e.g. a closed-form quadratic in a test).

Grid convention: ``grid[k]`` holds the coefficients of ``directions[k]`` (units: multiples of that
direction, so for a unit-norm direction the coefficient is the Euclidean norm of the displacement).
Points are numbered in C order over the grid (last axis fastest); shard ``i`` of ``n`` evaluates the
points ``i, i + n, i + 2n, ...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from landscape.data import TokenSet
from landscape.engine.directions import Direction, DirectionSpec, check_direction, layer_weight
from landscape.engine.sweep import POINT_ORDER, Execution
from landscape.objectives import InputSource, NLLConvention, check_in_vocabulary, layer_mse, nll
from landscape.store import StoreData, finish_run, model_provenance, read_store, start_run
from landscape.weights import Base, as_base, row_blocks, working_dtype

COORDINATE_PREFIX = "coords/axis"


# ---------------------------------------------------------------------------------------- objectives
class Objective(Protocol):
    """What a scan measures at each point. Called with the model holding the perturbed weights.

    An objective that only runs the model forward without gradients and never reads its weights says so
    with a class attribute ``forward_only = True`` (:class:`NLLObjective`): scans and radius searches along
    streamed directions then hold the point layer by layer (:class:`Perturbation` ``streamed``), in about one
    model's memory.
    """

    def output_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        """Names of the scalar values it returns, given the perturbed layers (fixed before the scan
        starts)."""

    def __call__(self, model: nn.Module, w0: Mapping[str, torch.Tensor]) -> Mapping[str, float]:
        """The values at the model's current weights; ``w0`` holds the unperturbed ``(out, in)`` weights of
        the perturbed layers (read-only)."""

    def provenance(self) -> dict[str, Any]:
        """JSON description stored with the results."""


@dataclass(frozen=True)
class NLLObjective:
    """Token-mean NLL (nats per scored token) of the perturbed model on ``data`` (output ``nll``)."""

    data: TokenSet
    batch_size: int = 8
    model_name: str = ""
    forward_only: ClassVar[bool] = True  # runs the model forward only: a streamed perturbation can measure it

    def output_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        return ("nll",)

    def __call__(self, model: nn.Module, w0: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {"nll": nll(model, self.data, batch_size=self.batch_size, model_name=self.model_name).value}

    def convention(self) -> NLLConvention:
        """The convention of every NLL of this objective (the one :func:`~landscape.objectives.nll`
        reports)."""
        return NLLConvention.for_data(self.data, self.model_name)

    def provenance(self) -> dict[str, Any]:
        return {"objective": "nll", "batch_size": self.batch_size,
                "nll_convention": self.convention().to_dict()}


@dataclass(frozen=True)
class LayerMSEObjective:
    """Output MSE of every perturbed layer against w0, ``mean((x dW^T)^2)`` (units: squared activations).

    Outputs ``layer_mse/<layer name>``. ``inputs="reference"``: each layer sees the inputs of the
    unperturbed model (the paper's layer-wise objective); ``"modified"``: the inputs of the perturbed
    model (sequential GPTQ's view). One extra forward pass over ``data`` per point.
    """

    data: TokenSet
    inputs: InputSource = "reference"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.inputs not in ("reference", "modified"):
            raise ValueError(f"inputs must be 'reference' or 'modified', got {self.inputs!r}")

    def output_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        return tuple(f"layer_mse/{name}" for name in layers)

    def __call__(self, model: nn.Module, w0: Mapping[str, torch.Tensor]) -> dict[str, float]:
        # objectives.layer_mse compares the model's current weights (here w0 + d) with given ones (here w0);
        # its "modified" mode swaps w0 back in for the forward pass, i.e. the unperturbed model's inputs.
        swap_inputs = "modified" if self.inputs == "reference" else "reference"
        mse = layer_mse(model, self.data, w0, inputs=swap_inputs, batch_size=self.batch_size)
        return {f"layer_mse/{name}": value for name, value in mse.items()}

    def provenance(self) -> dict[str, Any]:
        return {"objective": "layer_mse", "inputs": self.inputs, "batch_size": self.batch_size,
                "data_hash": self.data.content_hash,
                "unit": "squared activations, mean over tokens and outputs"}


@dataclass(frozen=True)
class FunctionObjective:
    """Any scalar function of the (perturbed) model, under the output name ``name``."""

    name: str
    function: Callable[[nn.Module], float]
    description: str = ""

    def output_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        return (self.name,)

    def __call__(self, model: nn.Module, w0: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {self.name: float(self.function(model))}

    def provenance(self) -> dict[str, Any]:
        return {"objective": self.name, "description": self.description}


def default_objectives(data: TokenSet | None, with_layer_mse: bool = False, batch_size: int = 8,
                       model_name: str = "") -> tuple[Objective, ...]:
    """NLL on ``data`` (and layer MSE with reference inputs if asked)."""
    if data is None:
        raise ValueError("pass data (a TokenSet) for the default NLL objective, or objectives=[...]")
    objectives: tuple[Objective, ...] = (NLLObjective(data, batch_size, model_name),)
    return objectives + ((LayerMSEObjective(data, "reference", batch_size),) if with_layer_mse else ())


# -------------------------------------------------------------------------------------- perturbation
class Perturbation:
    """Moves a model's weights to ``w0 + sum_k c_k d_k`` and back to w0, bit-exactly.

    Construction checks every direction against the model
    (:func:`~landscape.engine.directions.check_direction`). Two ways to hold a point, with the same numbers:

    * **resident** (``streamed=False``): w0 of the touched layers is saved, the directions are made whole,
      and :meth:`move_to` writes the point into every touched layer; any code may then read the weights or
      differentiate through them (extra memory: w0 of the touched layers and every direction);
    * **streamed** (``streamed=True``): nothing is saved up front; while the model runs forward, each touched
      layer is set to its point just before its own forward call (its direction's layer computed then, from a
      streamed direction) and put back right after, so at most one layer's w0 is held aside. For objectives
      that only run the model forward without gradients (:attr:`Objective.forward_only`): outside a forward
      call the weights read as w0.

    Use as a context manager: leaving it (normally or by an exception) restores w0 by copying saved weights
    back (never by subtracting). In a bfloat16 / float16 model the point is formed in float32 one layer at a
    time and rounded to the model's dtype once (directions stay in the model's dtype: no float32 copy of the
    model is ever held).
    """

    def __init__(self, model: nn.Module | Base, directions: Sequence[Direction], *, streamed: bool = False):
        if not directions:
            raise ValueError("a perturbation needs at least one direction")
        base = as_base(model)
        for direction in directions:
            check_direction(base, direction)
        model = self.model = base.model
        self.streamed = streamed
        self.layers: list[str] = list(dict.fromkeys(n for d in directions for n in d.names))
        self._targets = {n: layer_weight(model, n) for n in self.layers}  # (out, in) views of the parameters
        if streamed:  # the model holds w0 outside forward calls: these are views
            self.w0 = {n: t.detach() for n, t in self._targets.items()}
            self._steps: list[Mapping[str, torch.Tensor]] = [d.tensors for d in directions]
        else:
            self.w0 = {n: t.detach().clone() for n, t in self._targets.items()}
            self._steps = [{n: t.to(self._targets[n]) for n, t in d.tensors.items()} for d in directions]
        self._coefficients: tuple[float, ...] | None = None
        self._hooks: list[Any] = []
        self._held: tuple[str, torch.Tensor] | None = None  # streamed: the layer now at its point, and its w0

    def move_to(self, coefficients: Sequence[float]) -> None:
        """Set the touched layers to ``w0 + sum_k coefficients[k] * directions[k]`` (always starting from w0;
        streamed: each layer during its forward calls from now until :meth:`restore`)."""
        if len(coefficients) != len(self._steps):
            raise ValueError(f"need {len(self._steps)} coefficients, got {len(coefficients)}")
        self._coefficients = tuple(float(c) for c in coefficients)
        if self.streamed:
            if not self._hooks:
                self._hooks = [hook for name in self.layers for hook in self._register(name)]
            return
        for name, target in self._targets.items():
            self._write(name, target, self.w0[name])

    def restore(self) -> None:
        """Put w0 back into every touched layer (streamed: the layer held at its point, if any, and no layer
        moves on later forward calls)."""
        with torch.no_grad():
            if not self.streamed:
                for name, target in self._targets.items():
                    target.copy_(self.w0[name])
                return
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self._put_back()

    def measure(self, coefficients: Sequence[float], objectives: Sequence[Objective]) -> dict[str, float]:
        """The objectives at ``w0 + sum_k c_k d_k``; w0 is restored afterwards, also if an objective
        raises."""
        if self.streamed and (eager := [type(o).__name__ for o in objectives if not forward_only(o)]):
            raise ValueError(f"a streamed perturbation measures forward-only objectives; {eager} read the "
                             f"weights or their gradients: use Perturbation(..., streamed=False)")
        self.move_to(coefficients)
        try:
            values: dict[str, float] = {}
            for objective in objectives:
                values.update(objective(self.model, self.w0))
            return values
        finally:
            self.restore()

    def _write(self, name: str, target: torch.Tensor, w0: torch.Tensor) -> None:
        """``target <- w0 + sum_k c_k d_k[name]``; formed in float32 and rounded once for bfloat16 / float16.

        Whole float32 directions add into the layer itself. Otherwise the point is formed in a buffer a block
        of rows at a time (:func:`landscape.weights.row_blocks`) once every direction's layer is at hand (a
        streamed one is computed here, and a streamed displacement reads w0 from the layer): a block's
        float32 temporaries instead of the layer's."""
        moves = [(step, c) for step, c in zip(self._steps, self._coefficients) if name in step]
        work = working_dtype(target.dtype)
        with torch.no_grad():
            if work == target.dtype and not self.streamed:  # whole directions: the layer is the buffer
                target.copy_(w0)
                for step, c in moves:
                    target.add_(step[name].to(target), alpha=c)
                return
            layers = [step[name].to(target) for step, _ in moves]
            coefficients = [c for _, c in moves]
            for out, start, *rows in zip(row_blocks(target), row_blocks(w0), *map(row_blocks, layers)):
                point = start.to(work, copy=True)
                for d, c in zip(rows, coefficients):
                    if work == target.dtype:
                        point.add_(d, alpha=c)
                    else:  # bf16 / fp16: ((w0 + c1 d1) + c2 d2) in float32, rounded to the model's once
                        point.add_(d.to(work).mul_(c))  # c·d rounded, then added
                out.copy_(point)

    def _register(self, name: str) -> list[Any]:
        module = self.model.get_submodule(name)
        target = self._targets[name]

        def before(module: nn.Module, args: Any) -> None:
            self._put_back()  # a forward call that raised left its layer moved: w0 first
            with torch.no_grad():
                saved = target.detach().clone()
            self._held = (name, saved)
            self._write(name, target, saved)

        def after(module: nn.Module, args: Any, output: Any) -> None:
            self._put_back()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _put_back(self) -> None:
        if self._held is not None:
            name, saved = self._held
            with torch.no_grad():
                self._targets[name].copy_(saved)
            self._held = None

    def __enter__(self) -> Perturbation:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def forward_only(objective: Objective) -> bool:
    """Whether an objective only runs the model forward without gradients (and never reads its weights), so
    a streamed :class:`Perturbation` can measure it."""
    return bool(getattr(objective, "forward_only", False))


def holds_layer_by_layer(directions: Sequence[Direction], objectives: Sequence[Objective]) -> bool:
    """Whether a sweep holds its points layer by layer (a streamed :class:`Perturbation`): its directions ask
    for memory over time (some are streamed) and every objective allows it. Whole directions are in memory
    anyway, and the resident point costs less time."""
    return any(d.streamed for d in directions) and all(forward_only(o) for o in objectives)


def check_objective_data(model: nn.Module, objectives: Sequence[Objective]) -> None:
    """Token ids of every objective's data inside the model's vocabulary (before any point is measured)."""
    for objective in objectives:
        data = getattr(objective, "data", None)
        if isinstance(data, TokenSet):
            check_in_vocabulary(model, data, f"{type(objective).__name__} data")


def output_names(objectives: Sequence[Objective], layers: Sequence[str]) -> tuple[str, ...]:
    """All output names of the objectives; raises if two objectives would write the same name."""
    names = [n for objective in objectives for n in objective.output_names(layers)]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"objectives produce duplicate output names: {duplicates}")
    if not names:
        raise ValueError("objectives produce no outputs")
    return tuple(names)


def nll_convention(objectives: Sequence[Objective]) -> dict[str, Any] | None:
    """The NLL convention of the first :class:`NLLObjective` among ``objectives`` (``None`` if there is
    none)."""
    return next((o.convention().to_dict() for o in objectives if isinstance(o, NLLObjective)), None)


# ---------------------------------------------------------------------------------------------- scans
@dataclass(frozen=True)
class ScanResult:
    """Objective values over a grid of coefficients.

    Attributes:
        grid: one array of coefficients per direction (``grid[k]`` multiplies ``directions[k]``).
        values: output name (``nll``, ``layer_mse/<layer>``...) -> array of shape ``grid_shape``
            (NaN where ``done`` is False, e.g. points of other shards).
        done: boolean mask of evaluated points.
        directions: the specs of the directions (regenerable for random ones).
        provenance: model, fingerprints, data, NLL convention, objectives, shard, code version.
        path: the store it was read from, if any.
    """

    grid: tuple[np.ndarray, ...]
    values: dict[str, np.ndarray]
    done: np.ndarray
    directions: tuple[DirectionSpec, ...]
    provenance: dict[str, Any]
    path: Path | None = None

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(axis) for axis in self.grid)

    @classmethod
    def from_store(cls, path: str | Path) -> ScanResult:
        """Read a scan written by :func:`scan` (finished, or a ``.partial`` file by that name)."""
        return cls.from_data(read_store(path), Path(path))

    @classmethod
    def from_data(cls, data: StoreData, path: Path | None = None) -> ScanResult:
        """The scan held in a store's contents."""
        if data.provenance.get("kind") != "scan":
            raise ValueError(f"{path or 'the data'} holds a {data.provenance.get('kind')!r} run, not a scan")
        grid = tuple(data.arrays[f"{COORDINATE_PREFIX}{k}"] for k in range(len(data.grid_shape)))
        specs = tuple(DirectionSpec.from_dict(s) for s in data.provenance["directions"])
        values = {name: data.arrays[name] for name in data.point_arrays}
        return cls(grid, values, data.done, specs, data.provenance, path)


def scan(
    model: nn.Module | Base,
    directions: Direction | Sequence[Direction],
    grid: Sequence[Sequence[float] | np.ndarray] | np.ndarray,
    objectives: Sequence[Objective] | None = None,
    *,
    data: TokenSet | None = None,
    batch_size: int = 8,
    execution: Execution = Execution(),
) -> ScanResult:
    """Measure objectives at ``w0 + sum_k grid[k][i_k] * directions[k]`` for every grid point, in place.

    With streamed directions (``streamed=True`` where they are made) and forward-only objectives (the NLL),
    the point is held layer by layer (a streamed :class:`Perturbation`): the scan needs about one model's
    memory plus a few layers and the activations. Otherwise every layer is moved at once (w0 of the touched
    layers kept aside), which costs less time per point.

    Args:
        model: the model at w0, or its :class:`~landscape.weights.Base` (left bit-identical to w0, also on
            errors).
        directions: one direction (1-D scan) or a sequence (2-D: ``(u, v)``).
        grid: the coefficients along each direction; a single 1-D array is accepted for a 1-D scan.
        objectives: what to measure; default: the NLL on ``data`` (:func:`default_objectives` adds layer MSE).
        batch_size: segments per forward pass of the default objective.
        execution: the store the points go to (flushed as each finishes), resume, shard ``(i, n)`` (the points
            ``i, i + n, ...`` of the C-ordered grid), extra provenance, progress bar.

    Returns:
        The values of this run (and of earlier runs of a resumed store).

    Raises:
        ValueError (DirectionError, StoreError...): bad directions, grid, objectives or store, before any
            point is evaluated.
    """
    base = as_base(model)
    directions = (directions,) if isinstance(directions, Direction) else tuple(directions)
    axes = _check_grid(grid, len(directions))
    if objectives is None:
        objectives = default_objectives(data, False, batch_size, base.label)
    objectives = tuple(objectives)
    check_objective_data(base.model, objectives)
    grid_shape = tuple(len(axis) for axis in axes)
    specs = tuple(d.spec for d in directions)

    streamed = holds_layer_by_layer(directions, objectives)
    with Perturbation(base, directions, streamed=streamed) as perturbation:
        names = output_names(objectives, perturbation.layers)
        run_provenance = {
            "kind": "scan",
            **model_provenance(base),
            "directions": [s.to_dict() for s in specs],
            "grid": [axis.tolist() for axis in axes],
            "objectives": [o.provenance() for o in objectives],
            "nll_convention": nll_convention(objectives),
            "data": data.provenance() if data is not None else None,
            "shard": execution.shard_provenance(),
            "point_order": POINT_ORDER,
            **dict(execution.provenance),
        }
        mine = execution.mine(grid_shape)
        arrays = {n: ((), np.float64) for n in names}
        with start_run(execution.store, run_provenance, arrays, grid_shape, execution.resume) as record:
            if record.writable:
                for k, axis in enumerate(axes):
                    record.write_array(f"{COORDINATE_PREFIX}{k}", axis)
            todo = np.flatnonzero(mine & ~record.done)
            for flat in execution.progress_bar(todo, f"scan ({len(directions)}-D)"):
                coefficients = [axes[k][i] for k, i in enumerate(np.unravel_index(flat, grid_shape))]
                record.write_point(int(flat), perturbation.measure(coefficients, objectives))
            stored, path = finish_run(record)
    return ScanResult.from_data(stored, path)


def _check_grid(grid: Sequence[Sequence[float] | np.ndarray] | np.ndarray,
                n_directions: int) -> tuple[np.ndarray, ...]:
    if isinstance(grid, np.ndarray) and grid.ndim == 1:
        grid = [grid]
    elif (isinstance(grid, Sequence) and len(grid) > 0
          and all(isinstance(g, (int, float, np.number)) for g in grid)):
        grid = [grid]  # a single axis for a 1-D scan
    axes = []
    for k, axis in enumerate(grid):
        try:
            axis = np.asarray(axis, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"grid axis {k} must be a sequence of numbers, got {axis!r}") from None
        if axis.ndim != 1 or axis.size == 0:
            raise ValueError(f"grid axis {k} must be a non-empty 1-D sequence of coefficients, "
                             f"got shape {axis.shape}")
        if not np.isfinite(axis).all():
            bad = np.flatnonzero(~np.isfinite(axis)).tolist()
            raise ValueError(f"grid axis {k} has non-finite coefficients {axis[bad].tolist()} "
                             f"at positions {bad}; every coefficient must be a finite number")
        axes.append(axis)
    if len(axes) != n_directions:
        raise ValueError(f"the grid has {len(axes)} axes but there are {n_directions} directions: "
                         f"give one array of coefficients per direction")
    return tuple(axes)


def grid_axis(start: float, stop: float, count: int) -> np.ndarray:
    """``count`` evenly spaced coefficients from ``start`` to ``stop`` inclusive (``numpy.linspace``)."""
    if not (math.isfinite(start) and math.isfinite(stop)) or not isinstance(count, int) or count < 1:
        raise ValueError(f"a grid axis needs finite start and stop and an integer count >= 1, "
                         f"got {start}:{stop}:{count}")
    return np.linspace(start, stop, count)
