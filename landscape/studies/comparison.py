"""The result of a displacement comparison (:func:`landscape.studies.compare.compare_displacements`): what was
measured of each quantized model's displacement, its report and its store.

Conventions are those of :mod:`landscape.studies.compare`: norms, dot products and cosines are Euclidean over
the ``(out, in)`` weights of the compared layers, in float64; NLLs are token-mean nats/token with bootstrap
intervals over segments; curvatures are nats/token per squared weight unit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landscape.stats import Interval
from landscape.store import StoreRecord, read_store, write_record


class ComparisonError(ValueError):
    """Quantized models that cannot be compared: other base weights, unknown layers, bad settings."""


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class DisplacementMeasures:
    """Everything measured about one quantized model's displacement ``d = w_q - w0``.

    Attributes:
        label, method: the result's label (table row) and method (``rtn``, ``gptq``, ``qaft``...).
        format: the group it is reported under (its format's name; see the module docstring).
        norm: ``||d||`` over the compared layers (weight units); ``relative_norm``: ``||d|| / ||w0||``.
        layer_norms, layer_relative_norms: per layer, ``||d_l||`` and ``||d_l|| / ||w0_l||``.
        layer_mse: per layer output MSE on the full-precision model's inputs (squared activations).
        nll: token-mean NLL at ``w_q`` (nats/token) with its bootstrap interval over segments.
        path_nll: NLL at ``w0 + t d`` for ``t`` in :attr:`Comparison.path_t`.
        curvature: ``u^T H u`` at ``w0 + t d`` for ``t`` in :attr:`Comparison.curvature_t` (nats/token per
            squared weight unit); ``curvature_low`` / ``curvature_high``: interval bounds over batches
            (NaN when there were fewer than two batches).
        projections: ``<d, v_i>`` on each unit eigenvector ``v_i`` (weight units; sign is arbitrary
            because an eigenvector's is).
        slope: ``g^T u`` at the same points as ``curvature`` (nats/token per weight unit), with ``slope_low``
            / ``slope_high`` as for the curvature (NaN in stores written before the slope was measured).
    """

    label: str
    method: str
    format: str
    norm: float
    relative_norm: float
    layer_norms: Mapping[str, float]
    layer_relative_norms: Mapping[str, float]
    layer_mse: Mapping[str, float]
    nll: Interval
    path_nll: np.ndarray
    curvature: np.ndarray
    curvature_low: np.ndarray
    curvature_high: np.ndarray
    projections: np.ndarray
    slope: np.ndarray = field(default_factory=lambda: np.empty(0))
    slope_low: np.ndarray = field(default_factory=lambda: np.empty(0))
    slope_high: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def layer_mse_sum(self) -> float:
        """Output MSE summed over layers (GPTQ's objective, squared activations)."""
        return float(sum(self.layer_mse.values()))

    @property
    def captured_fraction(self) -> float:
        """``sum_i <d, v_i>^2 / ||d||^2``: the share of the squared displacement in the span of the
        (orthonormal) eigenvectors (NaN for a zero displacement)."""
        return float(np.sum(self.projections**2) / self.norm**2) if self.norm > 0 else math.nan


@dataclass(frozen=True)
class SegmentProfile:
    """NLL along the straight segment from one endpoint to another, ``lerp(w_start, w_end, t)``.

    Attributes:
        start, end: labels of the endpoints; ``distance``: ``||w_end - w_start||`` (weight units).
        t: ``(P,)`` segment coordinates; ``nll``: ``(P,)`` token-mean NLL there (nats/token).
    """

    start: str
    end: str
    distance: float
    t: np.ndarray
    nll: np.ndarray


@dataclass(frozen=True)
class Comparison:
    """Displacement analysis of quantized models of one base (see the module docstring).

    Attributes:
        model: the base model's name; ``w0_norm``: ``||w0||`` over :attr:`layers`.
        layers: the compared layers (union of the results' layers, in forward order).
        layer_w0_norms: ``||w0_l||`` per layer.
        center_nll: NLL(w0) with its interval, on the same data as every other NLL.
        rows: one :class:`DisplacementMeasures` per result, in the order given.
        cosines: ``(n, n)`` pairwise cosines of the displacements (NaN where one is zero).
        path_t, curvature_t: path coordinates of ``path_nll`` and ``curvature``.
        eigenvalues: ``(k,)`` eigenvalues of the eigenvectors projected on (NaN where unknown).
        between: NLL along the segments between endpoints.
        provenance: model fingerprint, data and NLL convention, settings, the results' provenance.
    """

    model: str
    w0_norm: float
    layers: tuple[str, ...]
    layer_w0_norms: Mapping[str, float]
    center_nll: Interval
    rows: tuple[DisplacementMeasures, ...]
    cosines: np.ndarray
    path_t: np.ndarray
    curvature_t: np.ndarray
    eigenvalues: np.ndarray
    between: tuple[SegmentProfile, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.rows]

    @property
    def formats(self) -> list[str]:
        """The format groups, in order of first appearance."""
        return list(dict.fromkeys(r.format for r in self.rows))

    def row(self, label: str) -> DisplacementMeasures:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no result labelled {label!r}; labels: {self.labels}")

    def cosine(self, a: str, b: str) -> float:
        """Cosine between the displacements of the results labelled ``a`` and ``b``."""
        labels = self.labels
        for x in (a, b):
            if x not in labels:
                raise KeyError(f"no result labelled {x!r}; labels: {labels}")
        return float(self.cosines[labels.index(a), labels.index(b)])

    # ------------------------------------------------------------------------------------- report
    def markdown(self, per_layer: bool = False) -> str:
        """The printed report: one table per format (and optionally per layer), cosines, segments."""
        conv = self.provenance.get("nll_convention", {})
        lines = [f"# Displacements of quantized {self.model}",
                 (f"||w0|| = {self.w0_norm:.4g} over {len(self.layers)} layers; NLL(w0) = "
                  f"{_interval(self.center_nll)} nats/token "
                  f"({conv.get('corpus', '?')}/{conv.get('split', '?')}, {conv.get('n_segments', '?')} x "
                  f"{conv.get('seq_len', '?')} tokens, {conv.get('n_tokens', '?')} scored, data "
                  f"{conv.get('data_hash', '?')}); layer MSE on the full-precision model's inputs.")]
        path_inner = [t for t in self.path_t if t not in (0.0, 1.0)]
        k = len(self.eigenvalues)
        for fmt in self.formats:
            rows = [r for r in self.rows if r.format == fmt]
            head = ["method", "‖d‖", "‖d‖/‖w0‖", "layer-MSE sum", "NLL [CI]", "ΔNLL"]
            head += [f"NLL t={t:g}" for t in path_inner]
            head += [f"uᵀHu t={t:g}" for t in self.curvature_t]
            head += [f"gᵀu t={t:g}" for t in self.curvature_t]
            head += [f"top-{k} share"] if k else []
            lines += ["", f"## {fmt}", "", _md_row(head), _md_row(["---"] * len(head))]
            for r in rows:
                cells = [r.label, f"{r.norm:.4g}", f"{r.relative_norm:.3%}", f"{r.layer_mse_sum:.4g}",
                         _interval(r.nll), f"{r.nll.value - self.center_nll.value:+.4f}"]
                cells += [f"{r.path_nll[list(self.path_t).index(t)]:.4f}" for t in path_inner]
                cells += [_with_interval(c, lo, hi)
                          for c, lo, hi in zip(r.curvature, r.curvature_low, r.curvature_high)]
                cells += ([_with_interval(g, lo, hi) for g, lo, hi in zip(r.slope, r.slope_low, r.slope_high)]
                          if len(r.slope) else ["n/a"] * len(self.curvature_t))
                cells += [f"{r.captured_fraction:.3g}"] if k else []
                lines.append(_md_row(cells))
            lines += ["", "cosines:", "", _md_row([""] + [r.label for r in rows]),
                      _md_row(["---"] * (len(rows) + 1))]
            for r in rows:
                lines.append(_md_row([r.label] + [f"{self.cosine(r.label, s.label):+.3f}" for s in rows]))
            lines += ["", *(g["sentence"] for g in self.provenance.get("control_adjusted", [])
                            if g["format"] == fmt)]
            segments = [s for s in self.between if self.row(s.start).format == fmt]
            if segments:
                head = ["segment", "‖w_end − w_start‖"] + [f"NLL t={t:g}" for t in segments[0].t]
                lines += ["", "NLL between endpoints:", "", _md_row(head), _md_row(["---"] * len(head))]
                lines += [_md_row([f"{s.start} → {s.end}", f"{s.distance:.4g}"] + [f"{v:.4f}" for v in s.nll])
                          for s in segments]
            if per_layer:
                head = ["layer"] + [f"{r.label} ‖d‖/‖w0‖" for r in rows] + [f"{r.label} MSE" for r in rows]
                lines += ["", "per layer:", "", _md_row(head), _md_row(["---"] * len(head))]
                lines += [_md_row([n] + [f"{r.layer_relative_norms[n]:.3%}" for r in rows]
                                  + [f"{r.layer_mse[n]:.4g}" for r in rows]) for n in self.layers]
        if k:
            source = self.provenance.get("eigenvectors") or {}
            converged = (f"; {sum(source['converged'])} of {k} converged after "
                         f"{source['lanczos_steps']} Lanczos steps"
                         if "converged" in source else "")
            lines += ["", (f"eigenvalues projected on: {np.array2string(self.eigenvalues, precision=4)} "
                           f"(nats/token per squared weight unit{converged})")]
        return "\n".join(lines)

    # -------------------------------------------------------------------------------------- store
    def to_record(self) -> StoreRecord:
        """Everything as arrays and tables: one point per result (norms, NLLs, curvatures, projections,
        per-layer values in the order of ``layers``), the cosine matrix, the segments, and one summary
        table per format under ``tables/<format>`` (the rows of :meth:`markdown`)."""
        n, level = len(self.rows), self.center_nll.level
        rows = {
            "norm": np.array([r.norm for r in self.rows]),
            "relative_norm": np.array([r.relative_norm for r in self.rows]),
            "layer_mse_sum": np.array([r.layer_mse_sum for r in self.rows]),
            "nll": np.array([r.nll.value for r in self.rows]),
            "nll_low": np.array([r.nll.low for r in self.rows]),
            "nll_high": np.array([r.nll.high for r in self.rows]),
            "path_nll": _stack([r.path_nll for r in self.rows], len(self.path_t)),
            "curvature": _stack([r.curvature for r in self.rows], len(self.curvature_t)),
            "curvature_low": _stack([r.curvature_low for r in self.rows], len(self.curvature_t)),
            "curvature_high": _stack([r.curvature_high for r in self.rows], len(self.curvature_t)),
            "slope": _stack([r.slope for r in self.rows], len(self.curvature_t)),
            "slope_low": _stack([r.slope_low for r in self.rows], len(self.curvature_t)),
            "slope_high": _stack([r.slope_high for r in self.rows], len(self.curvature_t)),
            "projections": _stack([r.projections for r in self.rows], len(self.eigenvalues)),
            "layer_norm": np.array([[r.layer_norms[n_] for n_ in self.layers]
                                    for r in self.rows]).reshape(n, -1),
            "layer_relative_norm": np.array([[r.layer_relative_norms[n_] for n_ in self.layers]
                                             for r in self.rows]).reshape(n, -1),
            "layer_mse": np.array([[r.layer_mse[n_] for n_ in self.layers]
                                   for r in self.rows]).reshape(n, -1),
        }
        arrays = {"cosines": self.cosines, "path_t": self.path_t, "curvature_t": self.curvature_t,
                  "eigenvalues": self.eigenvalues, "w0_norm": np.float64(self.w0_norm),
                  "layer_w0_norm": np.array([self.layer_w0_norms[n_] for n_ in self.layers]),
                  "center_nll": np.array([self.center_nll.value, self.center_nll.low, self.center_nll.high]),
                  "between_nll": _stack([s.nll for s in self.between],
                                        len(self.between[0].t) if self.between else 0),
                  "between_t": self.between[0].t if self.between else np.empty(0)}
        tables: dict[str, dict[str, list]] = {
            "results": {"label": self.labels, "method": [r.method for r in self.rows],
                        "format": [r.format for r in self.rows]},
            "layers": {"name": list(self.layers)},
            "between": {"start": [s.start for s in self.between], "end": [s.end for s in self.between],
                        "distance": [s.distance for s in self.between]},
        }
        for fmt in self.formats:
            chosen = [r for r in self.rows if r.format == fmt]
            tables[f"tables/{fmt}"] = {
                "label": [r.label for r in chosen], "method": [r.method for r in chosen],
                "norm": [r.norm for r in chosen], "relative_norm": [r.relative_norm for r in chosen],
                "layer_mse_sum": [r.layer_mse_sum for r in chosen], "nll": [r.nll.value for r in chosen],
                "nll_low": [r.nll.low for r in chosen], "nll_high": [r.nll.high for r in chosen],
                "delta_nll": [r.nll.value - self.center_nll.value for r in chosen],
                "captured_fraction": [r.captured_fraction for r in chosen]}
        provenance = {"kind": "comparison", "model": self.model, "nll_level": level,
                      "nll_interval_method": self.center_nll.method,
                      "n_resamples": self.center_nll.n_resamples,
                      **{k: v for k, v in self.provenance.items() if k not in ("kind", "model")}}
        return StoreRecord(provenance, rows, arrays, tables)

    def to_store(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_record` to a new HDF5 store at ``path`` (refused if it exists); returns the
        path."""
        return write_record(path, self.to_record())

    @classmethod
    def from_store(cls, path: str | os.PathLike) -> Comparison:
        """Read a comparison written by :meth:`to_store`."""
        data = read_store(path)
        prov, a = data.provenance, data.arrays
        if prov.get("kind") != "comparison":
            raise ComparisonError(f"{path} holds a {prov.get('kind')!r} run, not a comparison")
        level, method, resamples = prov["nll_level"], prov["nll_interval_method"], prov["n_resamples"]
        n_segments = prov["nll_convention"]["n_segments"]
        layers = tuple(str(x) for x in data.table("layers")["name"]) if "layers/name" in a else ()
        results = data.table("results")

        def interval(value, low, high) -> Interval:
            return Interval(float(value), float(low), float(high), level, method, resamples, n_segments)

        def per_layer(key: str, i: int) -> dict[str, float]:
            return {n: float(a[key][i][j]) for j, n in enumerate(layers)}

        rows = []
        for i, label in enumerate(results["label"]):
            # absent in older stores
            slope = {k: a[k][i] for k in ("slope", "slope_low", "slope_high") if k in a}
            rows.append(DisplacementMeasures(
                str(label), str(results["method"][i]), str(results["format"][i]), float(a["norm"][i]),
                float(a["relative_norm"][i]), per_layer("layer_norm", i), per_layer("layer_relative_norm", i),
                per_layer("layer_mse", i), interval(a["nll"][i], a["nll_low"][i], a["nll_high"][i]),
                a["path_nll"][i], a["curvature"][i], a["curvature_low"][i], a["curvature_high"][i],
                a["projections"][i], **slope))
        between = data.table("between") if "between/start" in a else {"start": [], "end": [], "distance": []}
        segments = tuple(SegmentProfile(str(s), str(e), float(d), a["between_t"], a["between_nll"][j])
                         for j, (s, e, d) in enumerate(zip(between["start"], between["end"],
                                                           between["distance"])))
        center = a["center_nll"]
        return cls(prov["model"], float(a["w0_norm"]), layers,
                   dict(zip(layers, map(float, a["layer_w0_norm"]))), interval(*center), tuple(rows),
                   a["cosines"], a["path_t"], a["curvature_t"], a["eigenvalues"], segments, prov)


def _stack(arrays: Sequence[np.ndarray], width: int) -> np.ndarray:
    return np.array([np.asarray(a, dtype=np.float64) for a in arrays]).reshape(len(arrays), width)


def _interval(interval: Interval) -> str:
    return f"{interval.value:.4f} [{interval.low:.4f}, {interval.high:.4f}]"


def _with_interval(value: float, low: float, high: float) -> str:
    if math.isnan(low):
        return f"{value:.4g}"
    return f"{value:.4g} [{low:.3g}, {high:.3g}]"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
