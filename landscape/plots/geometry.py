"""Figures 4-7: the radial NLL profile with R(w0) and the displacements, slices through w0, the Hessian
spectrum with the curvature along the displacements, and R(w0) and the GPTQ-QAFT gap against model size."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from landscape.curvature import read_curvature
from landscape.data import corpus_label
from landscape.engine.basin import BasinStatistics
from landscape.plots.common import (
    DISTANCE_AXIS,
    METHOD_COLORS,
    METHOD_LABELS,
    NLL_AXIS,
    QUANTIZED_METHODS,
    PlotError,
    add_caption,
    find_row,
    gap_interval,
    in_domain,
    merged_rows,
    model_of,
    model_sentence,
    nll_convention_sentence,
    num,
    quant_rows,
    require_kind,
    subset_nll,
)
from landscape.store import StoreData
from landscape.studies.quant_table import table_control_gaps


# --------------------------------------------------------------------------- figure 4: radial profile
def basin_summary(basin: StoreData) -> BasinStatistics:
    """The :class:`~landscape.engine.basin.BasinStatistics` of a basin-radius store."""
    require_kind(basin, "basin_radius")
    return BasinStatistics.from_data(basin)


def _subset_of_table(basin_prov: Mapping[str, Any], tables: Sequence[StoreData]) -> int:
    """How many leading evaluation windows of the tables the basin (or slice) NLL was measured on."""
    data = basin_prov["data"]
    evaluation = tables[0].provenance["evaluation"].get(data["corpus"])
    if (evaluation is None or evaluation["seq_len"] != data["seq_len"]
            or evaluation["tokenizer"] != data["tokenizer"]
            or data["n_segments"] > evaluation["n_segments"]):
        raise PlotError(f"the landscape store's data ({data['corpus']}, {data['n_segments']} × "
                        f"{data['seq_len']}) is not a leading subset of the tables' evaluation windows: its "
                        f"NLLs would not compare")
    return int(data["n_segments"])


def radial_profiles(basin: StoreData, tables: Sequence[StoreData]) -> go.Figure:
    """ΔNLL along random filter-normalised directions against the distance from w0, with R(w0) and the
    displacements of the quantized models (their norms as vertical lines, their ΔNLL as markers).

    Traces: ``"random direction <seed>"`` (x: radius, y: ΔNLL on the regular profile, 0 at w0),
    ``"median over directions"``, and ``"<METHOD> <format>"`` markers at ``(||w_q - w0||, ΔNLL(w_q))``.
    """
    stats = basin_summary(basin)
    rows = merged_rows(tables)
    n_segments = _subset_of_table(basin.provenance, tables)
    corpus = basin.provenance["data"]["corpus"]
    center = stats.center_value
    radii = np.concatenate([[0.0], stats.profile_radii])
    fig = go.Figure()
    for b, values in zip(stats.per_direction, stats.profile_values, strict=True):
        fig.add_trace(go.Scatter(x=radii, y=np.concatenate([[0.0], values - center]), mode="lines+markers",
                                 name=f"random direction {b.direction.seed}", legendgroup="random",
                                 line={"color": "#a0a0a0", "width": 1}, marker={"size": 4},
                                 opacity=0.6))
    median = np.median(stats.profile_values - center, axis=0)
    fig.add_trace(go.Scatter(x=radii, y=np.concatenate([[0.0], median]), mode="lines",
                             name="median over directions", line={"color": "#222222", "width": 3}))
    searched = np.concatenate([b.samples.radii for b in stats.per_direction])
    fig.add_trace(go.Scatter(x=searched,
                             y=np.concatenate([b.samples.values for b in stats.per_direction]) - center,
                             mode="markers", name="radius search (bracketing, bisection)",
                             marker={"symbol": "x-thin-open", "size": 6, "color": "#2ca02c"}))
    q = stats.quantiles((0.1, 0.5, 0.9))
    fig.add_vrect(x0=q[0.1], x1=q[0.9], fillcolor="#2ca02c", opacity=0.12, line_width=0)
    fig.add_vline(x=q[0.5], line={"color": "#2ca02c", "width": 2},
                  annotation_text=f"R(w0) = {q[0.5]:.3g}", annotation_position="top left")
    fig.add_hline(y=stats.level - center, line={"color": "#2ca02c", "dash": "dot", "width": 1},
                  annotation_text=f"+{stats.level - center:g} nats", annotation_position="top right")
    for row in rows:
        if row["method"] not in QUANTIZED_METHODS or row["label"] not in stats.displacement_norms:
            continue
        norm = stats.displacement_norms[row["label"]]
        fig.add_trace(go.Scatter(
            x=[norm], y=[subset_nll(row, corpus, n_segments) - center], mode="markers",
            name=f"{METHOD_LABELS[row['method']]} {row['format']}", legendgroup=row["method"],
            marker={"color": METHOD_COLORS[row["method"]], "size": 12, "symbol": "diamond"},
            hovertemplate=f"{row['label']}: ‖d‖ = %{{x:.4g}}, ΔNLL = %{{y:.4f}}<extra></extra>"))
        fig.add_vline(x=norm, line={"color": METHOD_COLORS[row["method"]], "dash": "dash", "width": 1},
                      opacity=0.5)
    prov = basin.provenance
    model, caveat = model_of(prov)
    s = prov["search"]
    fig.update_layout(title=f"Radial NLL profile around w0 of {model}: the basin R(w0) and the "
                            f"quantized displacements",
                      template="plotly_white", xaxis={"title": DISTANCE_AXIS},
                      yaxis={"title": "ΔNLL = NLL(w) − NLL(w0) (nats/token)"})
    return add_caption(fig, [
        f"Grey: {len(stats.per_direction)} Gaussian directions, filter-normalised (each output row as long "
        f"as w0's) then unit-norm, over all quantized linears (‖w0‖ = {stats.weights_norm:.4g}). Green: "
        f"R(w0), the radius where ΔNLL first exceeds {s['threshold']:g} nats (bracketing then bisection to "
        f"{s['tolerance']:g} relative width; crosses: every radius the search evaluated): median line, 10-90 "
        f"% band over directions. Diamonds and dashed lines: each quantized model's ‖w_q − w0‖ and its ΔNLL "
        f"on the same windows (from the quantization table's per-segment sums).",
        nll_convention_sentence(prov["nll_convention"]), model_sentence(model, caveat)])


def reading_radial(basin: StoreData, tables: Sequence[StoreData]) -> str:
    stats = basin_summary(basin)
    rows = merged_rows(tables)
    n_segments = _subset_of_table(basin.provenance, tables)
    corpus = basin.provenance["data"]["corpus"]
    q = stats.quantiles((0.1, 0.5, 0.9))
    median = np.median(stats.profile_values - stats.center_value, axis=0)
    sentences = [f"R(w0) (ΔNLL = +{stats.level - stats.center_value:g} nats) has median {q[0.5]:.4g} "
                 f"({q[0.5] / stats.weights_norm:.2%} of ‖w0‖; 10-90 %: {q[0.1]:.4g} to {q[0.9]:.4g}) over "
                 f"{len(stats.per_direction)} random directions."]
    for row in rows:
        if row["label"] not in stats.displacement_norms:
            continue
        norm = stats.displacement_norms[row["label"]]
        text = (f"{row['label']}: ‖d‖ = {norm:.4g} ({norm / q[0.5]:.1f} R), ΔNLL "
                f"{subset_nll(row, corpus, n_segments) - stats.center_value:+.3f}")
        if stats.profile_radii.size and stats.profile_radii[0] <= norm <= stats.profile_radii[-1]:
            text += (f" vs {np.interp(norm, stats.profile_radii, median):+.3f} along random directions at "
                     f"that distance")
        sentences.append(text + ".")
    return " ".join(sentences)


# ------------------------------------------------------------------------------------- figure 5: slices
def slices(lines: Sequence[StoreData], plane: StoreData) -> go.Figure:
    """1-D slices (left) and the 2-D slice (right) through w0 spanned by the GPTQ and QAFT displacements.

    Left traces: ``"along <label>"`` (x: distance from w0 along the unit direction, y: NLL) with endpoint
    markers ``"<label> endpoint"``. Right: a contour of NLL over the plane coordinates ``(a, b)`` (in
    distance units: ``w = w0 + a u + b v``, ``u`` along GPTQ, ``v`` orthogonal toward QAFT), markers
    for w0 and both endpoints.
    """
    for data in (*lines, plane):
        require_kind(data, "scan")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.1,
                        subplot_titles=["1-D slices through w0",
                                        "2-D slice: span of the GPTQ and QAFT displacements"])
    for data in lines:
        role = data.provenance["slice"]
        r, y = data.arrays["coords/axis0"], data.arrays["nll"]
        color = METHOD_COLORS[role["method"]]
        fig.add_trace(go.Scatter(x=r, y=y, mode="lines+markers", name=f"along {role['label']}",
                                 line={"color": color,
                                       "dash": "dot" if role["method"] == "random" else "solid"},
                                 legendgroup=role["label"]), row=1, col=1)
        if role.get("endpoint") is not None:
            end = int(np.argmin(np.abs(r - role["endpoint"])))
            fig.add_trace(go.Scatter(x=[r[end]], y=[y[end]], mode="markers", name=f"{role['label']} endpoint",
                                     legendgroup=role["label"], showlegend=False,
                                     marker={"color": color, "size": 13, "symbol": "star"}), row=1, col=1)
    a, b, z = plane.arrays["coords/axis0"], plane.arrays["coords/axis1"], plane.arrays["nll"]
    fig.add_trace(go.Contour(x=a, y=b, z=z.T, colorscale="Viridis", name="NLL over the plane",
                             colorbar={"title": "NLL (nats/token)", "x": 1.02},
                             contours={"showlabels": True},
                             hovertemplate="a %{x:.4g}, b %{y:.4g}: %{z:.4f}<extra></extra>"), row=1, col=2)
    ends = plane.provenance["slice"]["endpoints"]
    colors = ["#000000", *(METHOD_COLORS.get(e["method"], "#888888") for e in ends.values())]
    fig.add_trace(go.Scatter(x=[0.0, *(e["a"] for e in ends.values())],
                             y=[0.0, *(e["b"] for e in ends.values())], mode="markers+text",
                             text=["w0", *ends], textposition="top center",
                             marker={"color": colors, "size": 13, "symbol": "star",
                                     "line": {"width": 1, "color": "white"}},
                             name="w0 and endpoints", showlegend=False), row=1, col=2)
    prov = plane.provenance
    model, caveat = model_of(prov)
    fig.update_xaxes(title_text=DISTANCE_AXIS, row=1, col=1)
    fig.update_yaxes(title_text=NLL_AXIS, row=1, col=1)
    fig.update_xaxes(title_text="a: along the GPTQ displacement (weight units)", row=1, col=2)
    fig.update_yaxes(title_text="b: orthogonal, toward QAFT (weight units)", row=1, col=2)
    fmt = prov["slice"]["format"]
    fig.update_layout(title={"text": f"Slices through w0 of {model} along the GPTQ and QAFT "
                                     f"{fmt} displacements",
                             "y": 0.98, "yanchor": "top"},
                      template="plotly_white",
                      legend={"orientation": "h", "x": 0, "y": 1.08, "yanchor": "bottom"})
    return add_caption(fig, [
        "Left: NLL at w0 + r u for unit directions u: each displacement w_q − w0 (its endpoint, the "
        "quantized model, at r = ‖w_q − w0‖, star) and a random filter-normalised direction over the same "
        "distances as GPTQ's. Right: w0 + a u + b v with u = unit GPTQ displacement and v = the QAFT "
        "displacement made orthogonal to u (Gram-Schmidt) and unit: both endpoints lie in this plane.",
        nll_convention_sentence(prov["nll_convention"]), model_sentence(model, caveat)])


def reading_slices(lines: Sequence[StoreData], plane: StoreData) -> str:
    sentences = []
    center = None
    for data in lines:
        role, r, y = data.provenance["slice"], data.arrays["coords/axis0"], data.arrays["nll"]
        center = float(y[int(np.argmin(np.abs(r)))])
        if role.get("endpoint") is not None:
            end = int(np.argmin(np.abs(r - role["endpoint"])))
            sentences.append(f"along {role['label']} the NLL goes from {num(center)} at w0 to "
                             f"{num(float(y[end]))} at its endpoint (‖d‖ = {role['endpoint']:.4g})")
        else:
            sentences.append(f"along {role['label']} it reaches {num(float(y[-1]))} at distance "
                             f"{float(r[-1]):.4g}")
    ends = plane.provenance["slice"]["endpoints"]
    text = "On these windows, " + "; ".join(sentences) + "."
    qaft = next((e for e in ends.values() if e["method"] == "qaft"), None)
    if qaft is not None:
        cos = qaft["a"] / math.hypot(qaft["a"], qaft["b"])
        text += f" The QAFT displacement makes cos = {cos:.2f} with GPTQ's."
    return text


# ---------------------------------------------------------------------------------- figure 6: curvature
def curvature(hessian: StoreData) -> go.Figure:
    """Hessian spectral density with the extreme Lanczos eigenvalues and the trace (left), and the
    Rayleigh quotient along each displacement at points ``w0 + t d`` of its path (right).

    Left traces: ``"spectral density (SLQ)"`` (x: eigenvalue, y: density), ``"top eigenvalues"``,
    ``"bottom eigenvalues"``. Right: ``"along <label>"`` (x: t, y: u^T H(w0 + t d) u).
    """
    require_kind(hessian, "curvature")
    record, prov = read_curvature(hessian), hessian.provenance
    spectrum, trace, density = record.spectrum, record.trace, record.density
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["Hessian spectrum at w0", "curvature along each displacement"])
    fig.add_trace(go.Scatter(x=density.grid, y=density.density, mode="lines", name="spectral density (SLQ)",
                             line={"color": "#444444"}), row=1, col=1)
    for pairs, color in ((spectrum.top, "#d62728"), (spectrum.bottom, "#1f77b4")):
        values = pairs.eigenvalues
        fig.add_trace(go.Scatter(x=values, y=np.full(len(values), float(np.max(density.density))),
                                 mode="markers", name=f"{pairs.end} eigenvalues",
                                 marker={"symbol": "line-ns-open", "size": 18, "color": color},
                                 hovertemplate="λ = %{x:.4g}<extra></extra>"), row=1, col=1)
    for label in prov["paths"]:
        path = record.paths[label]
        t, k, low, high = path.t, path.curvature, path.low, path.high
        method = prov["paths"][label]["method"]
        error = ({"type": "data", "array": high - k, "arrayminus": k - low} if np.all(np.isfinite(low))
                 else None)
        line = {"color": METHOD_COLORS[method], "dash": "dot" if method == "random" else "solid"}
        fig.add_trace(go.Scatter(x=t, y=k, error_y=error, mode="lines+markers", name=f"along {label}",
                                 line=line),
                      row=1, col=2)
    model, caveat = model_of(prov)
    fig.update_xaxes(title_text="eigenvalue (nats/token per squared weight unit)", row=1, col=1)
    fig.update_yaxes(title_text="density (log scale)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="t: the point w0 + t (w_q − w0) of the path (0: w0, 1: the quantized model)",
                     row=1, col=2)
    fig.update_yaxes(title_text="u^T H u, u = d/‖d‖ (nats/token per squared unit)", row=1, col=2)
    fig.update_layout(title=f"Curvature of the NLL of {model}: spectrum at w0 and along the "
                            f"quantization paths",
                      template="plotly_white")
    converged = "all converged" if spectrum.converged else "NOT all converged (few Lanczos steps)"
    s = prov["settings"]
    interval = f", {s['level']:.0%} bootstrap over batches." if s["level"] else "."
    return add_caption(fig, [
        f"Hessian of the token-mean NLL over the {spectrum.n_params:,} weights of the quantized linears. "
        f"Lanczos ({spectrum.lanczos_steps} steps, reorthogonalised; Ritz pairs {converged}); trace by "
        f"Hutch++ ({trace.n_matvecs} products): {trace.value:.4g} ± {trace.stderr:.2g}; density by "
        f"stochastic Lanczos "
        f"quadrature ({s['density_runs']} run(s) × {s['density_steps']} steps). Right: the Rayleigh quotient "
        f"along each displacement d (and a random filter-normalised direction of GPTQ's length) at w0 "
        f"+ t d{interval}",
        nll_convention_sentence(prov["nll_convention"]), model_sentence(model, caveat)])


def reading_curvature(hessian: StoreData) -> str:
    require_kind(hessian, "curvature")
    record, prov = read_curvature(hessian), hessian.provenance
    trace = record.trace
    top, bottom = record.spectrum.top.eigenvalues, record.spectrum.bottom.eigenvalues
    text = (f"The largest Hessian eigenvalue at w0 is {top[0]:.4g}" + (f" and the smallest {bottom[0]:.4g}"
                                                                     if len(bottom) else "")
            + f"; the trace is {trace.value:.4g} ± {trace.stderr:.2g} (mean eigenvalue "
              f"{trace.mean_eigenvalue:.3g}).")
    paths = [(label, record.paths[label]) for label in prov["paths"]]
    parts = [f"{label} from {path.curvature[0]:.3g} at w0 to {path.curvature[-1]:.3g} at t = {path.t[-1]:g}"
             for label, path in paths]
    return text + " Curvature along the path: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------------- figure 7: model size
def size_points(models: Sequence[tuple[StoreData, StoreData, StoreData]], fmt: str) -> list[dict[str, Any]]:
    """Per model ``(facts, basin, headline table)``: parameters, relative R(w0) quantiles, ``||d_RTN|| / R``
    and ``||d_GPTQ|| / R``, the GPTQ − QAFT gap and, where the table has the full-precision fine-tuning
    control, the gap after it (``adjusted_gap``: :class:`~landscape.stats.ControlAdjustedGap`, else None)."""
    points = []
    for facts, basin, table in models:
        require_kind(facts, "model_facts")
        stats = basin_summary(basin)
        rows = quant_rows(table)
        gptq, qaft = find_row(rows, "gptq", fmt), find_row(rows, "qaft", fmt)
        if gptq is None or qaft is None:
            raise PlotError(f"the table of {table.provenance['model']} has no GPTQ and QAFT rows at {fmt}")
        rtn = find_row(rows, "rtn", fmt)
        corpus = in_domain(table)
        adjusted = [g for g in table_control_gaps(rows, [corpus]) if g.format == fmt]
        q = stats.quantiles((0.1, 0.5, 0.9), relative=True)
        norm = stats.displacement_norms
        points.append({"model": facts.provenance["model"], "n_params": int(facts.arrays["n_params"]),
                       "caveat": facts.provenance["model_info"].get("caveat", ""), "radius": stats.median,
                       "relative_radius": q, "gap": gap_interval(gptq, qaft, corpus),
                       "adjusted_gap": adjusted[0] if adjusted else None,
                       "rtn_norm_over_r": norm.get(rtn["label"] if rtn else "", math.nan) / stats.median,
                       "gptq_norm_over_r": norm.get(gptq["label"], math.nan) / stats.median})
    return sorted(points, key=lambda p: p["n_params"])


def model_size(models: Sequence[tuple[StoreData, StoreData, StoreData]], fmt: str) -> go.Figure:
    """R(w0) / ||w0|| (left) and the GPTQ − QAFT NLL gap at ``fmt`` (right) against the parameter count.

    ``models``: per model its ``(facts, basin, table)`` stores. Traces ``"R(w0) / ‖w0‖"`` (median, 10-90 %
    over directions) and ``"GPTQ − QAFT"`` (paired bootstrap interval), x = parameters.
    """
    points = size_points(models, fmt)
    x = [p["n_params"] for p in points]
    names = [p["model"] for p in points]
    corpus = corpus_label(in_domain(models[0][2]))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=["relative basin radius", f"GPTQ − QAFT NLL gap at {fmt} ({corpus})"])
    rel = np.array([p["relative_radius"][0.5] for p in points])
    with np.errstate(invalid="ignore"):  # an unbounded radius (inf) has no bar (nor a point): see the caption
        above = np.array([p["relative_radius"][0.9] for p in points]) - rel
        below = rel - np.array([p["relative_radius"][0.1] for p in points])
    above, below = np.where(np.isfinite(above), above, 0.0), np.where(np.isfinite(below), below, 0.0)
    fig.add_trace(go.Scatter(
        x=x, y=rel, mode="lines+markers+text", text=names, textposition="top center", name="R(w0) / ‖w0‖",
        error_y={"type": "data", "array": above, "arrayminus": below},
        line={"color": "#2ca02c"},
        customdata=[[p["radius"], p["rtn_norm_over_r"], p["gptq_norm_over_r"]] for p in points],
        hovertemplate="%{text}: R/‖w0‖ = %{y:.4f}, R = %{customdata[0]:.4g}, "
                      "‖d_RTN‖ = %{customdata[1]:.2f} R, ‖d_GPTQ‖ = %{customdata[2]:.2f} R<extra></extra>"),
        row=1, col=1)
    gap = np.array([p["gap"].value for p in points])
    fig.add_trace(go.Scatter(
        x=x, y=gap, mode="lines+markers+text", text=names, textposition="top center", name="GPTQ − QAFT",
        error_y={"type": "data", "array": [p["gap"].high for p in points] - gap,
                 "arrayminus": gap - [p["gap"].low for p in points]}, line={"color": "#d62728"}),
                  row=1, col=2)
    controlled = [p for p in points if p["adjusted_gap"] is not None]
    if controlled:
        left = [p["adjusted_gap"].remaining for p in controlled]
        remaining = np.array([i.value for i in left])
        fig.add_trace(go.Scatter(
            x=[p["n_params"] for p in controlled], y=remaining, mode="lines+markers",
            name="GPTQ − QAFT after the control", line={"color": "#d62728", "dash": "dot"},
            error_y={"type": "data", "array": [i.high for i in left] - remaining,
                     "arrayminus": remaining - [i.low for i in left]},
            text=[p["model"] for p in controlled],
            hovertemplate="%{text}: after the control %{y:+.3f} nats<extra></extra>"), row=1, col=2)
    fig.add_hline(y=0, line={"color": "#888888", "width": 1}, row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(title_text="parameters (log scale)", type="log", row=1, col=col)
    fig.update_yaxes(title_text="R(w0) / ‖w0‖ (median, 10-90 % over directions)", row=1, col=1)
    fig.update_yaxes(title_text="NLL(GPTQ) − NLL(QAFT) (nats/token, 95 % paired bootstrap)", row=1, col=2)
    fig.update_layout(title="Basin radius and the GPTQ-QAFT gap against model size", template="plotly_white")
    caveats = [f"{p['model']}: {p['caveat']}" for p in points if p["caveat"]]
    caveats += [f"{p['model']}: along some directions the NLL never rose by the threshold within the "
                f"search's largest radius, so R(w0) is unbounded there (quantiles {fmt_quantiles(p)}); an "
                f"untrained model's landscape is flat like this." for p in points
                if not all(math.isfinite(v) for v in p["relative_radius"].values())]
    basin = models[0][1].provenance
    return add_caption(fig, [
        f"R(w0): the radius where the held-out NLL first rises by {basin['search']['threshold']:g} nats "
        f"along random filter-normalised directions, relative to ‖w0‖ over the quantized linears. Gap: GPTQ "
        f"minus QAFT on the same held-out {corpus} windows, same calibration budget per model (sequence "
        f"lengths capped at each model's context; each model's NLL convention is in its stores); dotted: "
        f"the gap left after subtracting what full-precision fine-tuning on the same calibration text gains "
        f"(the control), where the table has it. Self-trained reference models barely notice quantization "
        f"(their gaps sit near 0 whatever their basin): they show how R(w0) and ‖d_RTN‖/R move with size "
        f"under one recipe, not how the gap does; a pretrained model (SmolLM2) is where the gap shows.",
        "Caveats. " + " ".join(caveats)])


def fmt_quantiles(point: dict[str, Any]) -> str:
    return ", ".join(f"{100 * q:g} %: {v:.3g}" for q, v in point["relative_radius"].items())


def reading_model_size(models: Sequence[tuple[StoreData, StoreData, StoreData]], fmt: str) -> str:
    points = size_points(models, fmt)
    def interval(i) -> str:
        return f"{i.value:+.3f} [{i.low:+.3f}, {i.high:+.3f}]"

    parts = [f"{p['model']} ({p['n_params']:,} parameters): R/‖w0‖ = {100 * p['relative_radius'][0.5]:.3g} "
             f"%, ‖d_RTN‖/R = {p['rtn_norm_over_r']:.2f}, GPTQ − QAFT = {interval(p['gap'])} nats"
             + (f", {interval(p['adjusted_gap'].remaining)} after the control" if p["adjusted_gap"] else "")
             for p in points]
    return f"At {fmt}: " + "; ".join(parts) + "."
