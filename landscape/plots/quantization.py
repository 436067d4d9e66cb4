"""Figures 1-3: NLL against bits per weight, the Pareto plot of NLL against model size, and local layer MSE
against global NLL (the misalignment)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from landscape.plots.common import (
    LABEL_SIDE,
    METHOD_COLORS,
    METHOD_LABELS,
    NLL_AXIS,
    QUANTIZED_METHODS,
    add_caption,
    corpus_title,
    find_row,
    gap_interval,
    granularity_of,
    merged_rows,
    method_label,
    model_of,
    model_sentence,
    nll_convention_sentence,
    num,
    require_kind,
    table_convention,
)
from landscape.quant.formats import parse_format
from landscape.stats import spearman
from landscape.store import StoreData
from landscape.studies.quant_table import table_control_gaps


# -------------------------------------------------------------------------------- figure 1: NLL vs bits
def nll_vs_bits(tables: Sequence[StoreData]) -> go.Figure:
    """Held-out NLL against bits per weight element, one line per method and granularity, one panel per
    corpus.

    Traces are named ``"<METHOD> · <granularity>"`` (x: bits, y: NLL, error bars: bootstrap interval);
    ``fp32 (w0)`` and the fine-tuning control are horizontal lines.
    """
    rows = merged_rows(tables)
    prov = tables[0].provenance
    corpora = list(prov["protocol"]["eval_corpora"])
    fig = make_subplots(rows=1, cols=len(corpora), subplot_titles=[corpus_title(c) for c in corpora],
                        shared_yaxes=True, horizontal_spacing=0.05)
    bits = sorted({parse_format(r["format"]).bits for r in rows if r["method"] in QUANTIZED_METHODS})
    x_span = [min(bits) - 0.3, max(bits) + 0.3] if bits else [2, 8]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["method"] in QUANTIZED_METHODS:
            groups.setdefault((row["method"], granularity_of(row["format"])), []).append(row)
    ordered = sorted(groups, key=lambda k: (QUANTIZED_METHODS.index(k[0]), k[1] != "per-channel", k[1]))
    for col, corpus in enumerate(corpora, start=1):
        for method, granularity in ordered:
            points = sorted(groups[(method, granularity)], key=lambda r: parse_format(r["format"]).bits)
            y = np.array([float(r["nll"][corpus]) for r in points])
            fig.add_trace(go.Scatter(
                x=[parse_format(r["format"]).bits for r in points], y=y,
                error_y={"type": "data", "array": [float(r["nll_high"][corpus]) for r in points] - y,
                         "arrayminus": y - [float(r["nll_low"][corpus]) for r in points]},
                mode="lines+markers", name=f"{METHOD_LABELS[method]} · {granularity}",
                legendgroup=method + granularity, showlegend=col == 1,
                line={"color": METHOD_COLORS[method],
                      "dash": "solid" if granularity == "per-channel" else "dash"},
                text=[r["label"] for r in points],
                hovertemplate="%{text}: %{y:.4f} nats/token<extra></extra>"),
                row=1, col=col)
        for method in ("fp32", "fp-finetune"):
            row = find_row(rows, method)
            if row is not None:
                fig.add_trace(go.Scatter(x=x_span, y=[float(row["nll"][corpus])] * 2, mode="lines",
                                         name=method_label(method, prov), legendgroup=method,
                                         showlegend=col == 1,
                                         line={"color": METHOD_COLORS[method],
                                               "dash": "dot" if method == "fp-finetune" else "solid",
                                               "width": 1}),
                              row=1, col=col)
        fig.update_xaxes(title_text="weight bits per element (integer code width)", tickvals=bits, row=1,
                         col=col)
    fig.update_yaxes(title_text=NLL_AXIS + ", log scale", type="log", row=1, col=1)
    model, caveat = model_of(prov)
    fig.update_layout(title=f"NLL against bits per weight: RTN, GPTQ, GPTQ + LoRC and QAFT on {model}",
                      template="plotly_white", legend={"orientation": "v"})
    return add_caption(fig, [
        "Quantized: every linear layer of the decoder blocks (embeddings and LM head stay full precision). "
        "Solid: per-channel scales; dashed: group scales. Dotted green: QAFT's control, the same fine-tuning "
        "loop on the same calibration text with the quantizer off (what adaptation to that text alone does).",
        *[gap.sentence() for gap in table_control_gaps(rows, corpora)],
        table_convention(prov), model_sentence(model, caveat)])


def reading_nll_vs_bits(tables: Sequence[StoreData]) -> str:
    """A paragraph of the figure-1 numbers: QAFT vs GPTQ (paired intervals) and RTN at each QAFT format."""
    rows = merged_rows(tables)
    corpora = list(tables[0].provenance["protocol"]["eval_corpora"])
    fp32 = find_row(rows, "fp32")
    unquantized = method_label("fp32", tables[0].provenance).removesuffix(" (w0)")
    sentences = [f"On {model_of(tables[0].provenance)[0]}, {unquantized} reaches "
                 + ", ".join(f"{num(float(fp32['nll'][c]))} nats/token on {c}" for c in corpora)
                 + "."] if fp32 else []
    for qaft in (r for r in rows if r["method"] == "qaft"):
        fmt = qaft["format"]
        gptq, rtn = find_row(rows, "gptq", fmt), find_row(rows, "rtn", fmt)
        if gptq is None:
            continue
        for c in corpora:
            gap = gap_interval(gptq, qaft, c)
            rtn_text = f", RTN {num(float(rtn['nll'][c]))}" if rtn is not None else ""
            sentences.append(f"{fmt} on {c}: GPTQ reaches {num(float(gptq['nll'][c]))} nats vs QAFT "
                             f"{num(float(qaft['nll'][c]))}{rtn_text}; GPTQ − QAFT = {gap.value:+.3f} "
                             f"[{gap.low:+.3f}, {gap.high:+.3f}].")
    sentences += [gap.sentence() for gap in table_control_gaps(rows, corpora)]
    lowest = min((parse_format(r["format"]).bits for r in rows if r["method"] == "gptq"), default=None)
    if lowest is not None:
        worst = [r for r in rows
                 if r["method"] in ("rtn", "gptq") and parse_format(r["format"]).bits == lowest]
        sentences.append(f"At {lowest} bits: " + ", ".join(
            f"{r['label']} {num(float(r['nll'][corpora[0]]))}" for r in worst) + f" on {corpora[0]}.")
    return " ".join(sentences)


# ------------------------------------------------------------------------------- figure 2: Pareto
def model_size_mib(bits_per_weight: float, facts: StoreData) -> float:
    """Model size in MiB: quantized linears at ``bits_per_weight`` (codes, scales, zero points, LoRC factors),
    every other weight (embeddings, norms, biases) in fp16."""
    require_kind(facts, "model_facts")
    n_params, n_quantized = int(facts.arrays["n_params"]), int(facts.arrays["n_quantized"])
    return (bits_per_weight * n_quantized + 16 * (n_params - n_quantized)) / 8 / 2**20


def pareto_front(sizes: Sequence[float], nlls: Sequence[float]) -> list[int]:
    """Indices of the Pareto-efficient points (no other point is at most as large and strictly better, or
    strictly smaller and at most as bad), by increasing size."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], nlls[i]))
    front, best = [], math.inf
    for i in order:
        if nlls[i] < best:
            front.append(i)
            best = nlls[i]
    return front


def pareto(tables: Sequence[StoreData], facts: StoreData) -> go.Figure:
    """NLL against model size in MiB: one trace per method (marker per format), the Pareto frontier per
    corpus.

    fp32 is counted as an fp16 deployment (16 bits per weight); the fine-tuning control is not a
    compressed model and is left out.
    """
    rows = [r for r in merged_rows(tables) if r["method"] in (*QUANTIZED_METHODS, "fp32")]
    prov = tables[0].provenance
    corpora = list(prov["protocol"]["eval_corpora"])
    sizes = [model_size_mib(r["bits_per_weight"], facts) for r in rows]
    fig = make_subplots(rows=1, cols=len(corpora), subplot_titles=[corpus_title(c) for c in corpora],
                        shared_yaxes=True, horizontal_spacing=0.05)
    for col, corpus in enumerate(corpora, start=1):
        nlls = [float(r["nll"][corpus]) for r in rows]
        for method in ("fp32", *QUANTIZED_METHODS):
            index = [i for i, r in enumerate(rows) if r["method"] == method]
            if not index:
                continue
            fig.add_trace(go.Scatter(
                x=[sizes[i] for i in index], y=[nlls[i] for i in index], mode="markers+text",
                text=[rows[i]["format"] or "fp16" for i in index],
                textposition=LABEL_SIDE.get(method, "top center"), name=method_label(method, prov),
                legendgroup=method, showlegend=col == 1, marker={"color": METHOD_COLORS[method], "size": 9},
                hovertemplate="%{text}: %{x:.2f} MiB, %{y:.4f} nats/token<extra></extra>"), row=1, col=col)
        front = pareto_front(sizes, nlls)
        fig.add_trace(go.Scatter(x=[sizes[i] for i in front], y=[nlls[i] for i in front], mode="lines",
                                 line={"shape": "hv", "color": "#444444", "width": 1}, name="Pareto frontier",
                                 legendgroup="front", showlegend=col == 1,
                                 text=[rows[i]["label"] for i in front], hoverinfo="text"), row=1, col=col)
        fig.update_xaxes(title_text="model size (MiB, log scale)", type="log", row=1, col=col)
    fig.update_yaxes(title_text=NLL_AXIS + ", log scale", type="log", row=1, col=1)
    model, caveat = model_of(prov)
    n_params, n_quantized = int(facts.arrays["n_params"]), int(facts.arrays["n_quantized"])
    fig.update_layout(title=f"Pareto: NLL against model size on {model}", template="plotly_white")
    return add_caption(fig, [
        f"Size: the {n_quantized:,} quantized weights at their storage bits (codes plus fp16 scales and zero "
        f"points per channel or group, plus LoRC's fp16 factors), the other {n_params - n_quantized:,} "
        f"weights in fp16; {method_label('fp32', prov).removesuffix(' (w0)')} is shown as its fp16 "
        f"deployment.", table_convention(prov),
        model_sentence(model, caveat)])


def reading_pareto(tables: Sequence[StoreData], facts: StoreData) -> str:
    rows = [r for r in merged_rows(tables) if r["method"] in (*QUANTIZED_METHODS, "fp32")]
    corpus = tables[0].provenance["protocol"]["eval_corpora"][0]
    sizes = [model_size_mib(r["bits_per_weight"], facts) for r in rows]
    front = pareto_front(sizes, [float(r["nll"][corpus]) for r in rows])
    points = ", ".join(f"{rows[i]['label']} ({sizes[i]:.1f} MiB, {num(float(rows[i]['nll'][corpus]))})"
                       for i in front)
    methods = [rows[i]["method"] for i in front]
    counts = ", ".join(f"{method_label(m, tables[0].provenance)} {methods.count(m)}"
                       for m in dict.fromkeys(methods))
    return (f"On {corpus}, the Pareto frontier (smallest NLL for its size) runs through {points}: {counts} "
            f"of its {len(front)} points.")


# ----------------------------------------------------------------------------- figure 3: misalignment
def misalignment(candidates: StoreData) -> go.Figure:
    """Layer-MSE sum against held-out NLL over many quantized candidates, one trace per method and format
    (named ``"<METHOD> <format>"``; x: summed layer MSE, y: NLL with its bootstrap interval)."""
    require_kind(candidates, "misalignment")
    table, a, done = candidates.table("candidates"), candidates.arrays, candidates.done
    groups: dict[tuple[str, str], list[int]] = {}
    for i in np.flatnonzero(done):
        groups.setdefault((str(table["method"][i]), str(table["format"][i])), []).append(int(i))
    formats = list(dict.fromkeys(str(f) for f in table["format"]))
    symbols = ["circle", "diamond", "square", "triangle-up", "cross", "x", "star"]
    fig = go.Figure()
    for (method, fmt), index in sorted(groups.items(), key=lambda kv: (formats.index(kv[0][1]),
                                                                       _method_rank(kv[0][0]))):
        y = a["nll"][index]
        fig.add_trace(go.Scatter(
            x=a["layer_mse_sum"][index], y=y, mode="markers", name=f"{METHOD_LABELS[method]} {fmt}",
            error_y={"type": "data", "array": a["nll_high"][index] - y, "arrayminus": y - a["nll_low"][index],
                     "thickness": 1},
            marker={"color": METHOD_COLORS[method], "size": 10 if method != "dither" else 7,
                    "symbol": symbols[formats.index(fmt) % len(symbols)],
                    "line": {"width": 1, "color": "white"}},
            text=[str(table["label"][i]) for i in index],
            hovertemplate="%{text}<br>layer MSE %{x:.4g}<br>NLL %{y:.4f}<extra></extra>"))
    prov = candidates.provenance
    model, caveat = model_of(prov)
    mse = prov["layer_mse"]
    fig.update_layout(title=f"Local layer MSE against global NLL: {int(done.sum())} quantized "
                            f"candidates of {model}",
                      template="plotly_white",
                      xaxis={"title": "sum over quantized layers of the output MSE (squared "
                                      "activations, log scale)",
                             "type": "log"},
                      yaxis={"title": NLL_AXIS + ", log scale", "type": "log"})
    return add_caption(fig, [
        "Marker shape: format; colour: method. Besides the quantization tables' RTN, GPTQ, GPTQ + LoRC and "
        "QAFT, dithered roundings onto the same grid, round(w0/s + z + σ(u − 1/2)) with u ~ U[0, 1) seeded "
        f"(σ = {', '.join(f'{s:g}' for s in _dither_strengths(table))}; σ = 1 is stochastic rounding), span "
        "the MSE axis.",
        f"Layer MSE: mean over tokens and outputs of (W x − W_q x)², summed over the {mse['n_layers']} "
        f"quantized layers, x from the full-precision model on the first {mse['n_segments']} calibration "
        f"sequences × {mse['seq_len']} tokens (data {mse['data_hash']}), the same for every candidate.",
        nll_convention_sentence(prov["nll_convention"]) + " Error bars: 95 % bootstrap over segments.",
        model_sentence(model, caveat)])


def _dither_strengths(table: Mapping[str, np.ndarray]) -> list[float]:
    """The dither strengths among a misalignment store's candidates, in order of first appearance."""
    return list(dict.fromkeys(float(s) for m, s in zip(table["method"], table["strength"])
                              if str(m) == "dither"))


def _method_rank(method: str) -> int:
    order = (*QUANTIZED_METHODS, "dither")
    return order.index(method) if method in order else len(order)


def reading_misalignment(candidates: StoreData) -> str:
    """Per format: how GPTQ's and QAFT's layer MSE and NLL compare with RTN's; the rank correlation
    overall."""
    require_kind(candidates, "misalignment")
    table, a = candidates.table("candidates"), candidates.arrays
    done = np.flatnonzero(candidates.done)
    sentences = []
    for fmt in dict.fromkeys(str(table["format"][i]) for i in done):
        here = {str(table["method"][i]): int(i) for i in done if str(table["format"][i]) == fmt}
        if "rtn" not in here:
            continue
        r = here["rtn"]
        parts = [f"{METHOD_LABELS[m]} has {a['layer_mse_sum'][i] / a['layer_mse_sum'][r]:.2f}× RTN's layer "
                 f"MSE and NLL {a['nll'][i] - a['nll'][r]:+.3f}" for m, i in here.items()
                 if m in ("gptq", "qaft")]
        if parts:
            sentences.append(f"At {fmt}: " + "; ".join(parts) + ".")
    if len(done) >= 3:
        rho = spearman(a["layer_mse_sum"][done], a["nll"][done])
        sentences.append(f"Over all {len(done)} candidates, the rank correlation between layer MSE and NLL "
                         f"is {rho:+.2f} (Spearman).")
    return " ".join(sentences)
