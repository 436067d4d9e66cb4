"""Quantized candidates around w0 and what each one costs locally and globally: the measurements behind the
misalignment of layer MSE and NLL (figure 3, :mod:`landscape.studies.misalignment`).

A candidate is a quantized model of w0: a saved or in-memory :class:`~landscape.quant.result.QuantResult`
(RTN, GPTQ, QAFT...) or, cheaply and in any number, a **random on-grid rounding** of w0
(:class:`RoundingSpec`) onto the very lattice RTN, GPTQ and QAFT share
(:func:`landscape.quant.formats.make_grid` of w0). Two kinds of rounding:

* ``stochastic``: ``fraction`` of the weights (chosen at random) go to one of the two grid points around them,
  the upper one with probability equal to their fractional position between them (unbiased stochastic
  rounding, ``E[w_q] = w0`` inside the grid's range); the rest round to nearest. ``fraction`` sweeps the
  candidates from RTN (0) to full stochastic rounding (1; about sqrt(2) x RTN's displacement norm). Each layer
  draws (float64) from its own generator seeded by ``sha256("rounding/<seed>/<layer>")``.
* ``dither``: every weight becomes ``round(w0 / s + z + strength (u - 1/2))`` (clamped to the code range) with
  ``u ~ U[0, 1)`` drawn (float32) from a generator seeded by ``sha256("<seed>/<format>/<layer>")``:
  ``strength`` 1 is stochastic rounding, 0 is RTN (figure 3's candidates).

A candidate is a pure function of (w0, kind, format, seed, fraction or strength). :func:`measure_candidates`
measures each candidate's displacement norm ``||w_q - w0||``, its layer output MSE (GPTQ's local objective, on
the inputs of the full-precision model, per layer and summed) and its token-mean NLL on held-out text with a
bootstrap interval over segments (QAFT's objective), into a resumable store of kind ``misalignment``; the
analysis of :mod:`landscape.studies.misalignment` adds its correlation tables to a store of the same kind and
layout.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from landscape.data import TokenSet
from landscape.engine.sweep import Execution
from landscape.objectives import layer_mse, nll
from landscape.quant.capture import resolve_layers
from landscape.quant.formats import Grid, QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult, read_result_metadata
from landscape.stats import nll_interval
from landscape.store import StoreData, finish_run, provenance, read_store, start_run
from landscape.studies.compare import check_layers_and_base, check_same_base
from landscape.weights import Base, as_base, quantizable_layers, swapped_weights, weight_matrix

RoundingKind = Literal["stochastic", "dither"]
ROUNDING_KINDS: tuple[str, ...] = ("stochastic", "dither")
ROUNDING_METHODS = {"stochastic": "stochastic-rounding", "dither": "dither"}  # the candidates' method names
KIND = "misalignment"


class MisalignmentError(ValueError):
    """Bad candidates or settings of a misalignment study."""


# ------------------------------------------------------------------------------------------ roundings
@dataclass(frozen=True)
class RoundingSpec:
    """A random on-grid rounding of w0, regenerable from its fields (see the module docstring).

    Attributes:
        format: the weight format (its min-max grid on w0 is the lattice).
        seed: seed of the draws (each layer draws from its own generator).
        fraction: ``stochastic``: share of the weights rounded stochastically (the rest round to nearest), in
            [0, 1].
        layers: layer names or globs (``None``: every quantizable layer).
        kind: ``stochastic`` or ``dither``.
        strength: ``dither``: the dither's width in grid steps (>= 0; 1 is stochastic rounding, 0 RTN).
    """

    format: QuantFormat | str
    seed: int
    fraction: float = 1.0
    layers: tuple[str, ...] | None = None
    kind: RoundingKind = "stochastic"
    strength: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", parse_format(self.format))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MisalignmentError(f"seed must be an integer, got {self.seed!r}")
        if self.kind not in ROUNDING_KINDS:
            raise MisalignmentError(f"rounding kind must be one of {ROUNDING_KINDS}, got {self.kind!r}")
        fraction, strength = self.fraction, self.strength
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise MisalignmentError(f"fraction (share of weights rounded stochastically) must be in [0, 1], "
                                    f"got {self.fraction!r}")
        if (isinstance(strength, bool) or not isinstance(strength, (int, float))
                or not 0 <= strength < math.inf):
            raise MisalignmentError(f"strength (the dither's width in grid steps) must be a finite number "
                                    f">= 0, got {self.strength!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def method(self) -> str:
        return ROUNDING_METHODS[self.kind]

    @property
    def label(self) -> str:
        if self.kind == "dither":
            return f"dither σ={self.strength:g} {self.format.name} seed {self.seed}"
        return f"stochastic {self.format.name} f{self.fraction:g} s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        layers = list(self.layers) if self.layers is not None else None
        if self.kind == "dither":
            return {"kind": "dither", "format": self.format.name, "seed": self.seed,
                    "strength": self.strength, "layers": layers}
        return {"format": self.format.name, "seed": self.seed, "fraction": self.fraction, "layers": layers}


def rounded(model: nn.Module | Base, spec: RoundingSpec) -> QuantResult:
    """The random on-grid rounding ``spec`` of the model's weights w0, as a :class:`QuantResult` (method
    ``stochastic-rounding`` or ``dither``; weights in the model's dtype and device; the model is not
    modified)."""
    base = as_base(model)
    names = resolve_layers(base.model, list(spec.layers) if spec.layers is not None else None, spec.format)
    modules = quantizable_layers(base.model)
    weights = {}
    with torch.no_grad():
        for name in names:
            w0 = weight_matrix(modules[name]).detach()
            grid = make_grid(w0, spec.format, name)
            if spec.kind == "dither":
                weights[name] = dithered_rounding(w0, grid, spec.strength,
                                                  dither_generator(spec.seed, spec.format, name))
            else:
                weights[name] = _stochastic_rounding(w0, grid, spec.fraction, spec.seed, name)
    settings = {"seed": spec.seed, "grid": "min-max of w0, static groups",
                "layers": list(spec.layers) if spec.layers is not None else None}
    settings |= {"strength": spec.strength} if spec.kind == "dither" else {"fraction": spec.fraction}
    return QuantResult(weights=weights, format=spec.format, method=spec.method, settings=settings,
                       base_model=base.label, base_fingerprint=base.fingerprint(names))


def _stochastic_rounding(w0: torch.Tensor, grid: Grid, fraction: float, seed: int, name: str) -> torch.Tensor:
    """``fraction`` of the entries of ``w0`` rounded stochastically onto ``grid``, the rest to nearest."""
    scale = grid.per_column(grid.scale).double()  # (out, in)
    zero = grid.per_column(grid.zero).double()
    position = w0.double() / scale + zero  # in code units
    lower = torch.floor(position)
    generator = torch.Generator().manual_seed(_layer_seed(seed, name))
    u_round = torch.rand(tuple(w0.shape), generator=generator, dtype=torch.float64).to(w0.device)
    u_pick = torch.rand(tuple(w0.shape), generator=generator, dtype=torch.float64).to(w0.device)
    stochastic = lower + (u_round < position - lower).double()
    codes = torch.where(u_pick < fraction, stochastic, torch.round(position))
    codes = codes.clamp(grid.fmt.qmin, grid.fmt.qmax).to(w0.dtype)
    return grid.dequantize(codes).contiguous()


def dithered_rounding(w0: torch.Tensor, grid: Grid, strength: float,
                      generator: torch.Generator) -> torch.Tensor:
    """``w0`` rounded onto ``grid`` after a uniform dither of ``strength`` grid steps.

    Each entry becomes the lattice point ``round(w0 / s + z + strength (u - 1/2))`` (clamped to the code
    range) with ``u ~ U[0, 1)`` drawn from ``generator`` (float32, then cast). ``strength = 1`` is
    stochastic rounding, ``floor(w0 / s + z + u)``: each entry goes up with probability equal to its
    fractional part, so the expectation is ``w0`` inside the range; ``strength = 0`` is round-to-nearest.
    """
    u = torch.rand(tuple(w0.shape), generator=generator, dtype=torch.float32).to(w0)
    step = grid.scale.repeat_interleave(grid.group_size, dim=1).to(w0)  # (out, in): one grid step per entry
    return grid.round(w0 + strength * (u - 0.5) * step)


def dither_generator(seed: int, fmt: QuantFormat | str, layer: str) -> torch.Generator:
    """A generator seeded by ``(seed, format, layer name)``: a layer's dither does not depend on the
    others."""
    digest = hashlib.sha256(f"{seed}/{parse_format(fmt).name}/{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one layer of a stochastic rounding, from (seed, layer name)."""
    return int.from_bytes(hashlib.sha256(f"rounding/{seed}/{name}".encode()).digest()[:8], "little") >> 1


def random_roundings(formats: Sequence[QuantFormat | str] | QuantFormat | str, seeds: Sequence[int],
                     fractions: Sequence[float] = (1.0,),
                     layers: Sequence[str] | None = None) -> dict[str, RoundingSpec]:
    """``label -> RoundingSpec`` of stochastic roundings for every format x fraction x seed (cheap: nothing is
    drawn until measured)."""
    formats = [formats] if isinstance(formats, (str, QuantFormat)) else list(formats)
    specs = [RoundingSpec(f, s, x, tuple(layers) if layers is not None else None)
             for f in formats for x in fractions for s in seeds]
    if not specs:
        raise MisalignmentError("random_roundings needs at least one format, fraction and seed")
    return {spec.label: spec for spec in specs}


def dithered_roundings(formats: Sequence[QuantFormat | str], strengths: Sequence[float],
                       seeds: Sequence[int]) -> dict[str, RoundingSpec]:
    """``label -> RoundingSpec`` of dithered roundings for every format x strength x seed, in that order."""
    specs = [RoundingSpec(f, s, kind="dither", strength=float(x))
             for f in formats for x in strengths for s in seeds]
    if not specs:
        raise MisalignmentError("dithered_roundings needs at least one format, strength and seed")
    return {spec.label: spec for spec in specs}


def method_name(method: str, settings: Mapping[str, Any]) -> str:
    """The name a result is listed under: its method, with GPTQ without act-order as ``gptq-noact``."""
    return "gptq-noact" if method == "gptq" and not settings.get("act_order", True) else method


# ------------------------------------------------------------------------------------------ the table
Candidate = QuantResult | RoundingSpec | str | os.PathLike


@dataclass(frozen=True)
class CandidateTable:
    """What was measured of each candidate (one row each).

    Attributes:
        labels, methods, formats: one entry per candidate.
        displacement_norm: ``||w_q - w0||`` over the candidate's layers (weight units).
        layer_mse_sum: output MSE summed over the layers, on the full-precision model's inputs (squared
            activations).
        nll: token-mean NLL (nats/token) on the evaluation data; ``nll_w0``: the same at w0 (NaN if not
            stored).
        provenance: model fingerprint, data, NLL convention, candidates' specs.
        nll_low, nll_high: 95 % bootstrap interval of each NLL over segments (NaN where not stored).
        layer_mse: ``(n, n_layers)`` output MSE per layer of :attr:`layers` (0 for a layer a candidate leaves
            at w0; empty where not stored).
        layers: the layers of ``layer_mse``.
    """

    labels: tuple[str, ...]
    methods: tuple[str, ...]
    formats: tuple[str, ...]
    displacement_norm: np.ndarray
    layer_mse_sum: np.ndarray
    nll: np.ndarray
    nll_w0: float
    provenance: Mapping[str, Any] = field(default_factory=dict)
    nll_low: np.ndarray | None = None
    nll_high: np.ndarray | None = None
    layer_mse: np.ndarray | None = None
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        nan = np.full(len(self.labels), np.nan)
        for name in ("nll_low", "nll_high"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, nan)
        if self.layer_mse is None:
            object.__setattr__(self, "layer_mse", np.empty((len(self.labels), 0)))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: Sequence[bool] | np.ndarray) -> CandidateTable:
        """The candidates where ``keep`` (one bool per candidate) is True, e.g.
        ``table.subset(np.array(table.methods) != "stochastic-rounding")``."""
        mask = np.asarray(keep)
        if mask.dtype != np.bool_ or mask.shape != (len(self),):
            raise MisalignmentError(f"keep must be {len(self)} booleans (one per candidate), got an array of "
                                    f"dtype {mask.dtype} and shape {mask.shape}")
        index = np.flatnonzero(mask)
        pick = lambda values: tuple(values[i] for i in index)  # noqa: E731
        prov = dict(self.provenance)
        if isinstance(prov.get("candidates"), Mapping):
            prov["candidates"] = {k: prov["candidates"][k] for k in pick(self.labels)
                                  if k in prov["candidates"]}
        return CandidateTable(pick(self.labels), pick(self.methods), pick(self.formats),
                              self.displacement_norm[index], self.layer_mse_sum[index], self.nll[index],
                              self.nll_w0, prov, self.nll_low[index], self.nll_high[index],
                              self.layer_mse[index], self.layers)

    def markdown(self) -> str:
        order = np.argsort(self.displacement_norm, kind="stable")
        lines = ["| candidate | method | format | ‖w_q − w0‖ | layer-MSE sum | NLL | ΔNLL |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {self.labels[i]} | {self.methods[i]} | {self.formats[i]} | "
                  f"{self.displacement_norm[i]:.4g} | {self.layer_mse_sum[i]:.4g} | {self.nll[i]:.4f} | "
                  f"{self.nll[i] - self.nll_w0:+.4f} |"
                  for i in order]
        return "\n".join(lines)

    def rows(self) -> dict[str, np.ndarray]:
        """The per-candidate arrays of a ``misalignment`` store (one point per candidate)."""
        rows = {"displacement_norm": self.displacement_norm, "layer_mse_sum": self.layer_mse_sum,
                "nll": self.nll, "nll_low": self.nll_low, "nll_high": self.nll_high}
        if self.layer_mse.shape[1]:
            rows["layer_mse"] = self.layer_mse
        return rows

    def table(self) -> dict[str, list]:
        """The ``candidates`` table of a ``misalignment`` store: label, method and format of each
        candidate."""
        return {"label": list(self.labels), "method": list(self.methods), "format": list(self.formats)}

    @classmethod
    def from_store(cls, path: str | os.PathLike) -> CandidateTable:
        """The candidates of a ``misalignment`` store (a measurement or an analysis, of this or older
        code)."""
        return cls.from_data(read_store(path), Path(path))

    @classmethod
    def from_data(cls, data: StoreData, path: Path | None = None) -> CandidateTable:
        """The finished candidates held in a ``misalignment`` store's contents."""
        prov, a = data.provenance, data.arrays
        if prov.get("kind") != KIND:
            raise MisalignmentError(f"{path or 'the data'} holds a {prov.get('kind')!r} run, "
                                    f"not a misalignment study")
        done = np.flatnonzero(data.done)
        names = data.table("candidates")
        strings = lambda column: tuple(str(names[column][i]) for i in done)  # noqa: E731
        optional = {k: a[k][done] for k in ("nll_low", "nll_high", "layer_mse") if k in a}
        layers = tuple(str(x) for x in a["layers"]) if "layers" in a else ()
        return cls(strings("label"), strings("method"), strings("format"), a["displacement_norm"][done],
                   a["layer_mse_sum"][done], a["nll"][done],
                   float(a["nll_w0"]) if "nll_w0" in a else math.nan,
                   {k: v for k, v in prov.items() if k not in ("kind", "settings")}, layers=layers,
                   **optional)


# ------------------------------------------------------------------------------------------ measuring
def measure_candidates(
    model: nn.Module | Base,
    candidates: Mapping[str, Candidate],
    data: TokenSet,
    *,
    mse_data: TokenSet | None = None,
    batch_size: int = 8,
    execution: Execution = Execution(),
) -> CandidateTable:
    """Measure every candidate: displacement norm, layer MSE per layer and summed (on ``mse_data``, default
    ``data``, with the full-precision model's inputs), and token-mean NLL on ``data`` with a 95 % bootstrap
    interval over its segments; one point per candidate into the store of ``execution`` (resumable).

    Args:
        candidates: label -> :class:`QuantResult`, :class:`RoundingSpec` (built when measured) or the path of
            a saved QuantResult (loaded when measured), so many candidates of a large model never sit in
            memory together. A path's metadata is checked against the model before anything is measured.
        batch_size: segments per forward pass (memory only).
        execution: the store, resume, extra provenance and progress bar (every candidate is measured: no
            shards).

    Raises:
        MisalignmentError / ComparisonError (ValueErrors): no candidates, results of another base, rounding
            formats that do not fit the layers; before any evaluation.
    """
    base = as_base(model)
    saved = _check_candidates(base, candidates)
    mse_data = mse_data or data
    for name, value in (("data", data), ("mse_data", mse_data)):
        if not isinstance(value, TokenSet):
            raise MisalignmentError(f"{name} must be a landscape.data.TokenSet, got {type(value).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MisalignmentError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if execution.shard != (0, 1):
        raise MisalignmentError(f"every candidate is measured: pass shard (0, 1), got {execution.shard}")
    execution.check_store()
    model = base.model
    layers = list(quantizable_layers(model))
    run_provenance = provenance(
        KIND, base, data,
        layer_mse={"n_layers": len(layers), "n_segments": mse_data.n_segments, "seq_len": mse_data.seq_len,
                   "data_hash": mse_data.content_hash, "inputs": "full-precision model (reference)",
                   "unit": "squared activations, mean over tokens and outputs, summed over layers"},
        mse_data=mse_data.provenance(), mse_inputs="full-precision model (reference)",
        candidates={label: _describe_candidate(c, saved.get(label)) for label, c in candidates.items()},
        **dict(execution.provenance))
    n_seg = data.n_segments
    arrays = {"displacement_norm": ((), np.float64), "layer_mse_sum": ((), np.float64),
              "layer_mse": ((len(layers),), np.float64), "nll": ((), np.float64), "nll_low": ((), np.float64),
              "nll_high": ((), np.float64), "segment_nll_sum": ((n_seg,), np.float64),
              "segment_tokens": ((n_seg,), np.int64)}
    w0 = {n: weight_matrix(quantizable_layers(model)[n]).detach() for n in layers}  # views of w0, read-only
    with start_run(execution.store, run_provenance, arrays, (len(candidates),), execution.resume) as record:
        if record.writable:
            center = nll(model, data, batch_size=batch_size, model_name=base.label)
            record.write_array("nll_w0", center.value)
            record.write_array("layers", layers)
            record.write_table("candidates", _candidate_columns(base, candidates, saved))
        for i in execution.progress_bar(np.flatnonzero(~record.done), "misalignment candidates"):
            label = list(candidates)[i]
            result = _result_of(base, candidates[label], label in saved)
            weights = {n: w.to(w0[n]) for n, w in result.weights.items()}
            with swapped_weights(model, weights):
                measured = nll(model, data, batch_size=batch_size, model_name=base.label)
            mse = layer_mse(model, mse_data, weights, inputs="reference", batch_size=batch_size)
            interval = nll_interval(measured)
            record.write_point(int(i), {
                "nll": measured.value, "nll_low": interval.low, "nll_high": interval.high,
                "segment_nll_sum": measured.segment_nll_sum, "segment_tokens": measured.segment_tokens,
                "layer_mse_sum": sum(mse.values()), "layer_mse": [mse.get(n, 0.0) for n in layers],
                "displacement_norm": _displacement_norm(w0, weights)})
        stored, path = finish_run(record)
    return CandidateTable.from_data(stored, path)


def _check_candidates(base: Base, candidates: Mapping[str, Candidate]) -> dict[str, dict[str, Any]]:
    """Every candidate checked against the base before anything is measured; returns the metadata of those
    given by the path of a saved result."""
    if not isinstance(candidates, Mapping) or not candidates:
        raise MisalignmentError("candidates must be a non-empty mapping label -> QuantResult or RoundingSpec")
    saved: dict[str, dict[str, Any]] = {}
    for label, candidate in candidates.items():
        if isinstance(candidate, (str, os.PathLike)):
            meta = read_result_metadata(candidate)
            check_layers_and_base(base, f"saved result {label!r} ({candidate})", meta["layers"],
                                  meta["base_model"], meta["base_fingerprint"])
            saved[label] = meta
        elif isinstance(candidate, RoundingSpec):  # the layers, and that the format fits every one
            resolve_layers(base.model, list(candidate.layers) if candidate.layers is not None else None,
                           candidate.format)
        elif not isinstance(candidate, QuantResult):
            raise MisalignmentError(f"candidate {label!r} is a {type(candidate).__name__}; accepted: "
                                    f"QuantResult, RoundingSpec, or the path of a saved QuantResult")
    check_same_base(base, {k: v for k, v in candidates.items() if isinstance(v, QuantResult)})
    return saved


def _result_of(base: Base, candidate: Candidate, is_saved: bool) -> QuantResult:
    if isinstance(candidate, RoundingSpec):
        return rounded(base, candidate)
    if is_saved:
        return QuantResult.load(candidate, base=base)  # its base, and that it lies on its grid
    return candidate


def _candidate_columns(base: Base, candidates: Mapping[str, Candidate],
                       saved: Mapping[str, dict[str, Any]]) -> dict[str, list]:
    """label, method, format, seed, dither strength and stochastic fraction of every candidate (NaN where a
    setting does not apply), from the specs and results' metadata (nothing is drawn or loaded)."""
    columns: dict[str, list] = {"label": [], "method": [], "format": [], "seed": [], "strength": [],
                                "fraction": []}
    for label, c in candidates.items():
        if isinstance(c, RoundingSpec):
            method, fmt, seed = c.method, c.format.name, c.seed
            strength = c.strength if c.kind == "dither" else math.nan
            fraction = c.fraction if c.kind == "stochastic" else math.nan
        else:
            meta = saved.get(label) or c.metadata()
            method = method_name(meta["method"], meta["settings"])
            fmt, seed, strength, fraction = meta["format"] or "none", 0, math.nan, math.nan
        for key, value in zip(columns, (label, method, fmt, seed, strength, fraction)):
            columns[key].append(value)
    return columns


def _describe_candidate(candidate: Any, meta: dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(candidate, RoundingSpec):
        return candidate.to_dict() | {"kind": f"random rounding ({candidate.kind})"}
    if meta is not None:
        return {"kind": "saved quant result", "path": str(candidate), "method": meta["method"],
                "settings": meta["settings"], "base_fingerprint": meta["base_fingerprint"]}
    return {"kind": "quant result", "method": candidate.method, "settings": candidate.settings,
            "base_fingerprint": candidate.base_fingerprint}


def _displacement_norm(w0: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((w.double() - w0[n].double()).pow(2).sum()) for n, w in weights.items()))
