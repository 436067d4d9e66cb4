"""Any store at a glance (``landscape show STORE``): what it holds, in words, and one interactive page.

:func:`store_summary` says the kind, model, dtype and device, the NLL convention, the settings, every array
with its shape and how many points are done. :func:`store_figure` draws what a store of each kind measures,
from its arrays alone: a scan (NLL along one direction, or a contour over two), a basin-radius search
(R(w0) per direction and the profiles), a curvature store (eigenvalues at both ends, the density, the paths),
a quantization table (figure 1's panels), and for any other store a table of its arrays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from landscape.curvature import read_curvature
from landscape.plots.common import add_caption, caption_of, nll_convention_sentence
from landscape.plots.quantization import nll_vs_bits
from landscape.store import StoreData

COORDINATES = "coords/axis"
CURVATURE_KINDS = ("spectrum", "curvature")
SETTINGS = ("search", "grid", "protocol", "settings", "profile_radii")  # provenance keys shown in the summary


def store_summary(data: StoreData, name: str = "store") -> str:
    """What ``data`` holds, in words: kind, model, convention, settings, arrays and done points."""
    p = data.provenance
    done, total = int(np.sum(data.done)), int(np.size(data.done))
    lines = [f"{name}: {p.get('kind', 'unknown kind')} store, {done} of {total} points done"
             + ("" if done == total else " (unfinished: resume it with the command that made it)")]
    model = p.get("model") or p.get("model_info", {}).get("name")
    if model:
        lines.append(f"model    {model} ({p.get('dtype', '?')} on {p.get('device', '?')})")
    convention = nll_convention_sentence(p.get("nll_convention"))
    if convention:
        lines.append(f"NLL      {convention.removeprefix('NLL: ')}")
    for key in ("created", "landscape_version", "torch_threads"):
        if key in p:
            lines.append(f"{key:<8} {p[key]}")
    settings = {k: v for k, v in p.items() if k in SETTINGS}
    for key, value in settings.items():
        text = json.dumps(value, default=str)
        lines.append(f"{key:<8} {text if len(text) <= 200 else text[:200] + ' ...'}")
    lines.append("arrays:")
    for array_name, value in sorted(data.arrays.items()):
        array, kind = np.asarray(value), "per point" if array_name in data.point_arrays else "whole"
        lines.append(f"  {array_name:<40} {str(array.dtype):<8} {str(tuple(array.shape)):<16} {kind}")
    return "\n".join(lines)


def store_figure(data: StoreData, name: str = "store") -> go.Figure:
    """The page of one store (module docstring); titled ``name``."""
    kind = data.provenance.get("kind")
    if kind == "scan":
        fig = _scan(data)
    elif kind == "basin_radius":
        fig = _radius(data)
    elif kind in CURVATURE_KINDS:
        fig = _curvature(data)
    elif kind == "quant_table":
        fig = nll_vs_bits([data])
    else:
        fig = _arrays_table(data)
    done = f"{int(np.sum(data.done))} of {np.size(data.done)} points"
    fig.update_layout(title=f"{name}: {kind or 'store'} ({done})", template="plotly_white")
    if caption_of(fig):  # a study's own figure (a quantization table) already states its convention
        return fig
    return add_caption(fig, [nll_convention_sentence(data.provenance.get("nll_convention")) or
                             "Every number on this page is read from the store."])


def _scan(data: StoreData) -> go.Figure:
    axes = [data.arrays[f"{COORDINATES}{k}"] for k in range(len(data.grid_shape))]
    values = [n for n in data.point_arrays if n == "nll"] or list(data.point_arrays)[:1]
    value = np.where(data.done, data.arrays[values[0]], np.nan)
    if len(axes) == 1:
        fig = go.Figure(go.Scatter(x=axes[0], y=value, mode="lines+markers", name=values[0]))
        fig.update_xaxes(title_text="coefficient a along the direction (w0 + a u)")
        fig.update_yaxes(title_text=values[0])
        return fig
    fig = go.Figure(go.Contour(x=axes[1], y=axes[0], z=value, colorbar={"title": values[0]}, name=values[0]))
    fig.update_xaxes(title_text="coefficient b (second direction)")
    fig.update_yaxes(title_text="coefficient a (first direction)")
    return fig


def _radius(data: StoreData) -> go.Figure:
    done = np.flatnonzero(data.done)
    profiles = "profile_value" in data.arrays
    right = "profiles" if profiles else "the search's evaluations"
    fig = make_subplots(rows=1, cols=2, subplot_titles=["R(w0) per direction (bracket)", right])
    radius = data.arrays["radius"][done]
    finite = np.isfinite(radius)
    with np.errstate(invalid="ignore"):  # a direction that never left the basin: R = inf, no bar
        above, below = data.arrays["upper"][done] - radius, radius - data.arrays["lower"][done]
    fig.add_trace(go.Scatter(x=done[finite], y=radius[finite], mode="markers", name="R(w0)",
                             error_y={"type": "data", "array": above[finite], "arrayminus": below[finite]}),
                  row=1, col=1)
    searched = np.nanmax(np.where(np.isfinite(data.arrays["search_radius"]), data.arrays["search_radius"],
                                  np.nan), axis=1)[done]
    if (~finite).any():  # drawn at the largest radius searched, a lower bound
        fig.add_trace(go.Scatter(x=done[~finite], y=searched[~finite], mode="markers",
                                 marker={"symbol": "triangle-up-open", "size": 10},
                                 name="no crossing up to this radius (R = inf)"), row=1, col=1)
    for i in done:
        if profiles:
            x, y = data.arrays["profile_radii"], data.arrays["profile_value"][i]
        else:
            evaluated = np.isfinite(data.arrays["search_radius"][i])  # the rest is padding
            x, y = data.arrays["search_radius"][i][evaluated], data.arrays["search_value"][i][evaluated]
            x, y = x[np.argsort(x)], y[np.argsort(x)]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"direction {i}"), row=1, col=2)
    fig.add_hline(y=float(data.arrays["level"]), line={"dash": "dot"}, row=1, col=2,
                  annotation_text="level (NLL(w0) + threshold)")
    fig.update_xaxes(title_text="direction", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="radius", row=1, col=1)
    fig.update_xaxes(title_text="radius (Euclidean norm of the displacement)", row=1, col=2)
    fig.update_yaxes(title_text=data.provenance.get("value_name", "value"), row=1, col=2)
    return fig


def _curvature(data: StoreData) -> go.Figure:
    record = read_curvature(data)
    panels = [name for name, present in (("eigenvalues at both ends", record.spectrum is not None),
                                         ("density (SLQ)", record.density is not None),
                                         ("curvature along each path", bool(record.paths))) if present]
    fig = make_subplots(rows=1, cols=max(1, len(panels)), subplot_titles=panels or ["(no curvature task)"])
    col = {name: k + 1 for k, name in enumerate(panels)}
    if record.spectrum is not None:
        for pairs in (record.spectrum.top, record.spectrum.bottom):
            if len(pairs):
                fig.add_trace(go.Scatter(x=np.arange(len(pairs.eigenvalues)), y=pairs.eigenvalues,
                                         mode="markers", name=f"{pairs.end} eigenvalues"),
                              row=1, col=col["eigenvalues at both ends"])
    if record.density is not None:
        fig.add_trace(go.Scatter(x=record.density.grid, y=record.density.density, mode="lines",
                                 name="density"), row=1, col=col["density (SLQ)"])
    for label, path in record.paths.items():
        fig.add_trace(go.Scatter(x=path.t, y=path.curvature, mode="lines+markers", name=label),
                      row=1, col=col["curvature along each path"])
    return fig


def _arrays_table(data: StoreData) -> go.Figure:
    rows: list[Mapping[str, Any]] = []
    for array_name, value in sorted(data.arrays.items()):
        array = np.asarray(value)
        numeric = np.issubdtype(array.dtype, np.number) and array.size
        rows.append({"array": array_name, "shape": str(tuple(array.shape)), "dtype": str(array.dtype),
                     "min": f"{np.nanmin(array):.6g}" if numeric else "", "max": f"{np.nanmax(array):.6g}"
                     if numeric else ""})
    columns = ("array", "shape", "dtype", "min", "max")
    return go.Figure(go.Table(header={"values": list(columns)},
                              cells={"values": [[r[c] for r in rows] for c in columns]}))
