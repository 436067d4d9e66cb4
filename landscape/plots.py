"""Plotly figures of the seven headline results, built from result stores only (never a model).

Every builder takes :class:`~landscape.store.StoreData` (what :func:`~landscape.store.read_store` returns)
and returns a ``plotly.graph_objects.Figure`` with axis labels in stated units, a legend, and a caption
below the plot computed from the stores' provenance: the model and its caveat, the NLL convention, the
calibration budget, the settings that define the numbers. Each ``reading_*`` function writes a short
paragraph from the same stored numbers (for ``figures/index.html``).

Conventions shared by all figures:

* **NLL**: token-mean negative log-likelihood, nats per scored token, over disjoint held-out windows
  (the convention is printed in every caption; numbers from different conventions are never mixed on one
  axis: a subset NLL is recomputed from the stored per-segment sums of the same windows).
* **Distances**: Euclidean norm over every weight of the quantized decoder linears (weight units), the
  units of ``||w_q - w0||`` and of the basin radius R(w0).
* **Intervals**: 95 % bootstrap over held-out segments (paired for differences), from the stored sums.

Write the figures with :func:`landscape.figio.write_figure` (offline HTML, optional PNG).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from landscape import stats
from landscape.curvature import read_curvature
from landscape.engine.basin import BasinStatistics
from landscape.quant.formats import parse_format
from landscape.stats import ControlAdjustedGap, Interval, difference_interval, spearman
from landscape.store import StoreData
from landscape.studies.quant_table import quant_table_rows

METHOD_LABELS: dict[str, str] = {
    "fp32": "fp32 (w0)", "rtn": "RTN", "gptq": "GPTQ", "gptq-noact": "GPTQ (no act-order)",
    "gptq+lorc": "GPTQ + LoRC", "qaft": "QAFT", "fp-finetune": "fp32 fine-tuned (QAFT's control)",
    "dither": "dithered rounding", "random": "random direction",
}
METHOD_COLORS: dict[str, str] = {
    "fp32": "#000000", "rtn": "#7f7f7f", "gptq": "#1f77b4", "gptq-noact": "#6baed6", "gptq+lorc": "#9467bd",
    "qaft": "#d62728", "fp-finetune": "#2ca02c", "dither": "#ff7f0e", "random": "#17becf",
}
QUANTIZED_METHODS = ("rtn", "gptq", "gptq-noact", "gptq+lorc", "qaft")
# Figure 2: each method labels its points on its own side, so labels of nearby points do not overlap.
LABEL_SIDE = {"fp32": "top center", "rtn": "middle left", "gptq": "top center", "gptq-noact": "bottom center",
              "gptq+lorc": "bottom center", "qaft": "middle right"}
CORPUS_TITLES = {"wiki": "in-domain: wiki held-out", "sotu": "out-of-domain: State of the Union"}
NLL_AXIS = "held-out NLL (nats/token)"
DISTANCE_AXIS = "distance from w0, ‖w − w0‖ (Euclidean, weight units)"
CAPTION_WIDTH = 170  # characters per caption line


class PlotError(ValueError):
    """Stores that cannot make the asked figure: wrong kind, unfinished, or mixing NLL conventions."""


# ------------------------------------------------------------------------------- reading stores
def quant_rows(data: StoreData) -> list[dict[str, Any]]:
    """The finished rows of a quantization-table store (:func:`landscape.studies.quant_table.run_quant_table`).

    Each row: ``label, method, format, seed``, ``bits_per_weight``, ``displacement_norm``, ``layer_mse_sum``,
    and per evaluation corpus ``nll``, ``nll_low``, ``nll_high``, ``segment_nll_sum``, ``segment_tokens``.
    Rows with quantized activations (``act_bits``) are left out: these figures compare weight quantization.
    """
    _require_kind(data, "quant_table")
    return [row for row in quant_table_rows(data) if not row["act_bits"]]


def merged_rows(tables: Sequence[StoreData]) -> list[dict[str, Any]]:
    """Rows of several quantization tables of one model on the same evaluation windows (the fp32 row once).

    Raises:
        PlotError: tables of different models or evaluation data (their NLLs are not comparable).
    """
    if not tables:
        raise PlotError("no quantization table to plot")
    first = tables[0].provenance
    for other in tables[1:]:
        _require_same_evaluation(first, other.provenance)
    rows: dict[str, dict[str, Any]] = {}
    for data in tables:
        for row in quant_rows(data):
            rows.setdefault(row["label"], row)
    return list(rows.values())


def subset_nll(row: Mapping[str, Any], corpus: str, n_segments: int) -> float:
    """Token-mean NLL of a table row over its first ``n_segments`` evaluation windows (from stored sums)."""
    sums, tokens = row["segment_nll_sum"][corpus], row["segment_tokens"][corpus]
    if not 1 <= n_segments <= len(sums):
        raise PlotError(f"asked for the first {n_segments} segments of {row['label']}, the table has {len(sums)}")
    return float(np.sum(sums[:n_segments]) / np.sum(tokens[:n_segments]))


def gap_interval(a: Mapping[str, Any], b: Mapping[str, Any], corpus: str) -> Interval:
    """``NLL(a) - NLL(b)`` of two table rows with its paired 95 % bootstrap interval over the same windows."""
    return difference_interval(b["segment_nll_sum"][corpus], b["segment_tokens"][corpus],
                               a["segment_nll_sum"][corpus], a["segment_tokens"][corpus], paired=True)


def _require_kind(data: StoreData, kind: str) -> None:
    found = data.provenance.get("kind")
    if found != kind:
        raise PlotError(f"expected a {kind!r} store, got a {found!r} store")
    if not data.done.any():
        raise PlotError(f"the {kind!r} store holds no finished point")


def _require_same_evaluation(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if a.get("model_fingerprint") != b.get("model_fingerprint"):
        raise PlotError(f"tables of different models: {a.get('model')!r} ({a.get('model_fingerprint')}) and "
                        f"{b.get('model')!r} ({b.get('model_fingerprint')})")
    hashes = [{c: e["data_hash"] for c, e in p["evaluation"].items()} for p in (a, b)]
    if hashes[0] != hashes[1]:
        raise PlotError(f"tables evaluated on different data ({hashes[0]} vs {hashes[1]}): their NLLs do not compare")


def _find(rows: Sequence[Mapping[str, Any]], method: str, fmt: str | None = None) -> Mapping[str, Any] | None:
    for row in rows:
        if row["method"] == method and (fmt is None or row["format"] == fmt):
            return row
    return None


def control_gaps(rows: Sequence[Mapping[str, Any]], corpora: Sequence[str]) -> list[ControlAdjustedGap]:
    """Per format with GPTQ, QAFT and the fine-tuning control (and fp32), per corpus: QAFT's advantage over GPTQ
    and how much of it remains after the control (:func:`landscape.stats.control_gaps`; seeds averaged)."""
    fp32 = _find(rows, "fp32")
    if fp32 is None:
        return []
    per_corpus = {c: {g.format: g for g in stats.control_gaps(
        [(r["method"], r["format"], r["segment_nll_sum"][c]) for r in rows], fp32["segment_nll_sum"][c],
        fp32["segment_tokens"][c], c)} for c in corpora}
    formats = dict.fromkeys(r["format"] for r in rows if r["method"] == "qaft")
    return [per_corpus[c][f] for f in formats for c in corpora if f in per_corpus[c]]


# ---------------------------------------------------------------------------------------- captions
def _wrap(text: str) -> str:
    return "<br>".join(textwrap.wrap(text, CAPTION_WIDTH, break_on_hyphens=False))


def add_caption(fig: go.Figure, paragraphs: Sequence[str]) -> go.Figure:
    """Put ``paragraphs`` below the plot as one annotation named ``caption`` (and make room for it)."""
    text = "<br>".join(_wrap(p) for p in paragraphs if p)
    lines = text.count("<br>") + 1
    fig.add_annotation(name="caption", text=text, xref="paper", yref="paper", x=0, y=0, xanchor="left",
                       yanchor="top", yshift=-70, showarrow=False, align="left", font={"size": 11})
    fig.update_layout(margin={"b": 90 + 15 * lines, "t": 110, "l": 70, "r": 30}, height=590 + 15 * lines)
    return fig


def caption_of(fig: go.Figure) -> str:
    """The caption text of a figure built here (HTML line breaks as newlines)."""
    for annotation in fig.layout.annotations:
        if annotation.name == "caption":
            return annotation.text.replace("<br>", "\n")
    return ""


def model_sentence(model: str, caveat: str) -> str:
    return f"Model: {model}." + (f" Caveat: {caveat}" if caveat else "")


def table_convention(provenance: Mapping[str, Any]) -> str:
    """The NLL convention and calibration budget of a quantization table, in words."""
    p = provenance["protocol"]
    parts = [f"{c}/{e['split']} {e['n_segments']} × {e['seq_len']} tokens (stride {e['stride']}, "
             f"{e['n_scored_tokens']:,} scored tokens, data {e['data_hash']})"
             for c, e in ((c, provenance["evaluation"][c]) for c in p["eval_corpora"])]
    cal = provenance["calibration"]
    return (f"NLL: token-mean nats per scored token over disjoint windows of {'; '.join(parts)}. "
            f"Error bars: 95 % bootstrap over segments. Every method uses the same {cal['n_segments']} calibration "
            f"sequences × {cal['seq_len']} tokens ({cal['corpus']}/{cal['split']}, seed {cal['seed']}, data "
            f"{cal['data_hash']}) and the same min-max grid of w0 per layer; GPTQ with act-order (gptq-noact: "
            f"without; every saved quantized model records its settings); QAFT: straight-through estimator, AdamW lr "
            f"{p['qaft_lr']:g}, {p['qaft_epochs']:g} epoch(s) in batches of {p['qaft_batch_size']}; LoRC rank "
            f"{p['lorc_rank']}.")


def nll_convention_sentence(convention: Mapping[str, Any] | None) -> str:
    """An :class:`~landscape.objectives.NLLConvention` dict in words."""
    if not convention:
        return ""
    c = convention
    return (f"NLL: token-mean nats per scored token on {c['corpus']}/{c['split']} {c['n_segments']} × {c['seq_len']} "
            f"tokens (stride {c['stride']}, {c['n_tokens']:,} scored tokens, data {c['data_hash']}).")


def _model_of(provenance: Mapping[str, Any]) -> tuple[str, str]:
    info = provenance.get("model_info") or {}
    return provenance.get("model") or info.get("name", "?"), provenance.get("model_caveat") or info.get("caveat", "")


def _granularity(fmt: str) -> str:
    f = parse_format(fmt)
    base = {"channel": "per-channel", "tensor": "per-tensor"}.get(f.granularity) or \
        (f"g{f.group_size}" if f.granularity == "group" else f"MX block {f.group_size}")
    return base + (" sym" if f.symmetric and f.granularity != "mx" else "") + (" fz" if f.float_zero else "")


def _num(x: float) -> str:
    """Three decimals for NLL-sized numbers, three significant digits otherwise."""
    return f"{x:.3f}" if 0.1 <= abs(x) < 100 else f"{x:.3g}"


# -------------------------------------------------------------------------------- figure 1: NLL vs bits
def nll_vs_bits(tables: Sequence[StoreData]) -> go.Figure:
    """Held-out NLL against bits per weight element, one line per method and granularity, one panel per corpus.

    Traces are named ``"<METHOD> · <granularity>"`` (x: bits, y: NLL, error bars: bootstrap interval);
    ``fp32 (w0)`` and the fine-tuning control are horizontal lines.
    """
    rows = merged_rows(tables)
    prov = tables[0].provenance
    corpora = list(prov["protocol"]["eval_corpora"])
    fig = make_subplots(rows=1, cols=len(corpora), subplot_titles=[CORPUS_TITLES.get(c, c) for c in corpora],
                        shared_yaxes=True, horizontal_spacing=0.05)
    bits = sorted({parse_format(r["format"]).bits for r in rows if r["method"] in QUANTIZED_METHODS})
    x_span = [min(bits) - 0.3, max(bits) + 0.3] if bits else [2, 8]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["method"] in QUANTIZED_METHODS:
            groups.setdefault((row["method"], _granularity(row["format"])), []).append(row)
    ordered = sorted(groups, key=lambda k: (QUANTIZED_METHODS.index(k[0]), k[1] != "per-channel", k[1]))
    for col, corpus in enumerate(corpora, start=1):
        for method, granularity in ordered:
            points = sorted(groups[(method, granularity)], key=lambda r: parse_format(r["format"]).bits)
            y = np.array([float(r["nll"][corpus]) for r in points])
            fig.add_trace(go.Scatter(
                x=[parse_format(r["format"]).bits for r in points], y=y,
                error_y={"type": "data", "array": [float(r["nll_high"][corpus]) for r in points] - y,
                         "arrayminus": y - [float(r["nll_low"][corpus]) for r in points]},
                mode="lines+markers", name=f"{METHOD_LABELS[method]} · {granularity}", legendgroup=method + granularity,
                showlegend=col == 1, line={"color": METHOD_COLORS[method],
                                           "dash": "solid" if granularity == "per-channel" else "dash"},
                text=[r["label"] for r in points], hovertemplate="%{text}: %{y:.4f} nats/token<extra></extra>"),
                row=1, col=col)
        for method in ("fp32", "fp-finetune"):
            row = _find(rows, method)
            if row is not None:
                fig.add_trace(go.Scatter(x=x_span, y=[float(row["nll"][corpus])] * 2, mode="lines",
                                         name=METHOD_LABELS[method], legendgroup=method, showlegend=col == 1,
                                         line={"color": METHOD_COLORS[method],
                                               "dash": "dot" if method == "fp-finetune" else "solid", "width": 1}),
                              row=1, col=col)
        fig.update_xaxes(title_text="weight bits per element (integer code width)", tickvals=bits, row=1, col=col)
    fig.update_yaxes(title_text=NLL_AXIS + ", log scale", type="log", row=1, col=1)
    model, caveat = _model_of(prov)
    fig.update_layout(title=f"NLL against bits per weight: RTN, GPTQ, GPTQ + LoRC and QAFT on {model}",
                      template="plotly_white", legend={"orientation": "v"})
    return add_caption(fig, [
        "Quantized: every linear layer of the decoder blocks (embeddings and LM head stay full precision). "
        "Solid: per-channel scales; dashed: group scales. Dotted green: QAFT's control, the same fine-tuning loop "
        "on the same calibration text with the quantizer off (what adaptation to that text alone does).",
        *[gap.sentence() for gap in control_gaps(rows, corpora)],
        table_convention(prov), model_sentence(model, caveat)])


def reading_nll_vs_bits(tables: Sequence[StoreData]) -> str:
    """A paragraph of the figure-1 numbers: QAFT vs GPTQ (paired intervals) and RTN at each QAFT format."""
    rows = merged_rows(tables)
    corpora = list(tables[0].provenance["protocol"]["eval_corpora"])
    fp32 = _find(rows, "fp32")
    sentences = [f"On {_model_of(tables[0].provenance)[0]}, fp32 reaches "
                 + ", ".join(f"{_num(float(fp32['nll'][c]))} nats/token on {c}" for c in corpora) + "."] if fp32 else []
    for qaft in (r for r in rows if r["method"] == "qaft"):
        fmt = qaft["format"]
        gptq, rtn = _find(rows, "gptq", fmt), _find(rows, "rtn", fmt)
        if gptq is None:
            continue
        for c in corpora:
            gap = gap_interval(gptq, qaft, c)
            rtn_text = f", RTN {_num(float(rtn['nll'][c]))}" if rtn is not None else ""
            sentences.append(f"{fmt} on {c}: GPTQ reaches {_num(float(gptq['nll'][c]))} nats vs QAFT "
                             f"{_num(float(qaft['nll'][c]))}{rtn_text}; GPTQ − QAFT = {gap.value:+.3f} "
                             f"[{gap.low:+.3f}, {gap.high:+.3f}].")
    sentences += [gap.sentence() for gap in control_gaps(rows, corpora)]
    lowest = min((parse_format(r["format"]).bits for r in rows if r["method"] == "gptq"), default=None)
    if lowest is not None:
        worst = [r for r in rows if r["method"] in ("rtn", "gptq") and parse_format(r["format"]).bits == lowest]
        sentences.append(f"At {lowest} bits: " + ", ".join(
            f"{r['label']} {_num(float(r['nll'][corpora[0]]))}" for r in worst) + f" on {corpora[0]}.")
    return " ".join(sentences)


# ------------------------------------------------------------------------------- figure 2: Pareto
def model_size_mib(bits_per_weight: float, facts: StoreData) -> float:
    """Model size in MiB: quantized linears at ``bits_per_weight`` (codes, scales, zero points, LoRC factors),
    every other weight (embeddings, norms, biases) in fp16."""
    _require_kind(facts, "model_facts")
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
    """NLL against model size in MiB: one trace per method (marker per format), the Pareto frontier per corpus.

    fp32 is counted as an fp16 deployment (16 bits per weight); the fine-tuning control is not a
    compressed model and is left out.
    """
    rows = [r for r in merged_rows(tables) if r["method"] in (*QUANTIZED_METHODS, "fp32")]
    prov = tables[0].provenance
    corpora = list(prov["protocol"]["eval_corpora"])
    sizes = [model_size_mib(r["bits_per_weight"], facts) for r in rows]
    fig = make_subplots(rows=1, cols=len(corpora), subplot_titles=[CORPUS_TITLES.get(c, c) for c in corpora],
                        shared_yaxes=True, horizontal_spacing=0.05)
    for col, corpus in enumerate(corpora, start=1):
        nlls = [float(r["nll"][corpus]) for r in rows]
        for method in ("fp32", *QUANTIZED_METHODS):
            index = [i for i, r in enumerate(rows) if r["method"] == method]
            if not index:
                continue
            fig.add_trace(go.Scatter(
                x=[sizes[i] for i in index], y=[nlls[i] for i in index], mode="markers+text",
                text=[rows[i]["format"] or "fp16" for i in index], textposition=LABEL_SIDE.get(method, "top center"),
                name=METHOD_LABELS[method], legendgroup=method, showlegend=col == 1,
                marker={"color": METHOD_COLORS[method], "size": 9},
                hovertemplate="%{text}: %{x:.2f} MiB, %{y:.4f} nats/token<extra></extra>"), row=1, col=col)
        front = pareto_front(sizes, nlls)
        fig.add_trace(go.Scatter(x=[sizes[i] for i in front], y=[nlls[i] for i in front], mode="lines",
                                 line={"shape": "hv", "color": "#444444", "width": 1}, name="Pareto frontier",
                                 legendgroup="front", showlegend=col == 1,
                                 text=[rows[i]["label"] for i in front], hoverinfo="text"), row=1, col=col)
        fig.update_xaxes(title_text="model size (MiB, log scale)", type="log", row=1, col=col)
    fig.update_yaxes(title_text=NLL_AXIS + ", log scale", type="log", row=1, col=1)
    model, caveat = _model_of(prov)
    n_params, n_quantized = int(facts.arrays["n_params"]), int(facts.arrays["n_quantized"])
    fig.update_layout(title=f"Pareto: NLL against model size on {model}", template="plotly_white")
    return add_caption(fig, [
        f"Size: the {n_quantized:,} quantized weights at their storage bits (codes plus fp16 scales and zero points "
        f"per channel or group, plus LoRC's fp16 factors), the other {n_params - n_quantized:,} weights in fp16; "
        f"fp32 is shown as its fp16 deployment.", table_convention(prov), model_sentence(model, caveat)])


def reading_pareto(tables: Sequence[StoreData], facts: StoreData) -> str:
    rows = [r for r in merged_rows(tables) if r["method"] in (*QUANTIZED_METHODS, "fp32")]
    corpus = tables[0].provenance["protocol"]["eval_corpora"][0]
    sizes = [model_size_mib(r["bits_per_weight"], facts) for r in rows]
    front = pareto_front(sizes, [float(r["nll"][corpus]) for r in rows])
    points = ", ".join(f"{rows[i]['label']} ({sizes[i]:.1f} MiB, {_num(float(rows[i]['nll'][corpus]))})" for i in front)
    methods = [rows[i]["method"] for i in front]
    counts = ", ".join(f"{METHOD_LABELS[m]} {methods.count(m)}" for m in dict.fromkeys(methods))
    return (f"On {corpus}, the Pareto frontier (smallest NLL for its size) runs through {points}: {counts} of its "
            f"{len(front)} points.")


# ----------------------------------------------------------------------------- figure 3: misalignment
def misalignment(candidates: StoreData) -> go.Figure:
    """Layer-MSE sum against held-out NLL over many quantized candidates, one trace per method and format
    (named ``"<METHOD> <format>"``; x: summed layer MSE, y: NLL with its bootstrap interval)."""
    _require_kind(candidates, "misalignment")
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
                    "symbol": symbols[formats.index(fmt) % len(symbols)], "line": {"width": 1, "color": "white"}},
            text=[str(table["label"][i]) for i in index],
            hovertemplate="%{text}<br>layer MSE %{x:.4g}<br>NLL %{y:.4f}<extra></extra>"))
    prov = candidates.provenance
    model, caveat = _model_of(prov)
    mse = prov["layer_mse"]
    fig.update_layout(title=f"Local layer MSE against global NLL: {int(done.sum())} quantized candidates of {model}",
                      template="plotly_white",
                      xaxis={"title": "sum over quantized layers of the output MSE (squared activations, log scale)",
                             "type": "log"},
                      yaxis={"title": NLL_AXIS + ", log scale", "type": "log"})
    return add_caption(fig, [
        "Marker shape: format; colour: method. Besides the quantization tables' RTN, GPTQ, GPTQ + LoRC and QAFT, "
        "dithered roundings onto the same grid, round(w0/s + z + σ(u − 1/2)) with u ~ U[0, 1) seeded "
        f"(σ = {', '.join(f'{s:g}' for s in _dither_strengths(table))}; σ = 1 is stochastic rounding), span the "
        "MSE axis.",
        f"Layer MSE: mean over tokens and outputs of (W x − W_q x)², summed over the {mse['n_layers']} quantized "
        f"layers, x from the full-precision model on the first {mse['n_segments']} calibration sequences × "
        f"{mse['seq_len']} tokens (data {mse['data_hash']}), the same for every candidate.",
        nll_convention_sentence(prov["nll_convention"]) + " Error bars: 95 % bootstrap over segments.",
        model_sentence(model, caveat)])


def _dither_strengths(table: Mapping[str, np.ndarray]) -> list[float]:
    """The dither strengths among a misalignment store's candidates, in order of first appearance."""
    return list(dict.fromkeys(float(s) for m, s in zip(table["method"], table["strength"]) if str(m) == "dither"))


def _method_rank(method: str) -> int:
    order = (*QUANTIZED_METHODS, "dither")
    return order.index(method) if method in order else len(order)


def reading_misalignment(candidates: StoreData) -> str:
    """Per format: how GPTQ's and QAFT's layer MSE and NLL compare with RTN's; the rank correlation overall."""
    _require_kind(candidates, "misalignment")
    table, a = candidates.table("candidates"), candidates.arrays
    done = np.flatnonzero(candidates.done)
    sentences = []
    for fmt in dict.fromkeys(str(table["format"][i]) for i in done):
        here = {str(table["method"][i]): int(i) for i in done if str(table["format"][i]) == fmt}
        if "rtn" not in here:
            continue
        r = here["rtn"]
        parts = [f"{METHOD_LABELS[m]} has {a['layer_mse_sum'][i] / a['layer_mse_sum'][r]:.2f}× RTN's layer MSE and "
                 f"NLL {a['nll'][i] - a['nll'][r]:+.3f}" for m, i in here.items() if m in ("gptq", "qaft")]
        if parts:
            sentences.append(f"At {fmt}: " + "; ".join(parts) + ".")
    if len(done) >= 3:
        rho = spearman(a["layer_mse_sum"][done], a["nll"][done])
        sentences.append(f"Over all {len(done)} candidates, the rank correlation between layer MSE and NLL is "
                         f"{rho:+.2f} (Spearman).")
    return " ".join(sentences)


# --------------------------------------------------------------------------- figure 4: radial profile
def basin_summary(basin: StoreData) -> BasinStatistics:
    """The :class:`~landscape.engine.basin.BasinStatistics` of a basin-radius store."""
    _require_kind(basin, "basin_radius")
    return BasinStatistics.from_data(basin)


def _subset_of_table(basin_prov: Mapping[str, Any], tables: Sequence[StoreData]) -> int:
    """How many leading evaluation windows of the tables the basin (or slice) NLL was measured on."""
    data = basin_prov["data"]
    evaluation = tables[0].provenance["evaluation"].get(data["corpus"])
    if (evaluation is None or evaluation["seq_len"] != data["seq_len"] or evaluation["tokenizer"] != data["tokenizer"]
            or data["n_segments"] > evaluation["n_segments"]):
        raise PlotError(f"the landscape store's data ({data['corpus']}, {data['n_segments']} × {data['seq_len']}) is "
                        f"not a leading subset of the tables' evaluation windows: its NLLs would not compare")
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
    fig.add_trace(go.Scatter(x=radii, y=np.concatenate([[0.0], median]), mode="lines", name="median over directions",
                             line={"color": "#222222", "width": 3}))
    searched = np.concatenate([b.samples.radii for b in stats.per_direction])
    fig.add_trace(go.Scatter(x=searched, y=np.concatenate([b.samples.values for b in stats.per_direction]) - center,
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
        fig.add_vline(x=norm, line={"color": METHOD_COLORS[row["method"]], "dash": "dash", "width": 1}, opacity=0.5)
    prov = basin.provenance
    model, caveat = _model_of(prov)
    s = prov["search"]
    fig.update_layout(title=f"Radial NLL profile around w0 of {model}: the basin R(w0) and the quantized displacements",
                      template="plotly_white", xaxis={"title": DISTANCE_AXIS},
                      yaxis={"title": "ΔNLL = NLL(w) − NLL(w0) (nats/token)"})
    return add_caption(fig, [
        f"Grey: {len(stats.per_direction)} Gaussian directions, filter-normalised (each output row as long as w0's) "
        f"then unit-norm, over all quantized linears (‖w0‖ = {stats.weights_norm:.4g}). Green: R(w0), the radius "
        f"where ΔNLL first exceeds {s['threshold']:g} nats (bracketing then bisection to {s['tolerance']:g} relative "
        f"width; crosses: every radius the search evaluated): median line, 10-90 % band over directions. Diamonds "
        f"and dashed lines: each quantized model's ‖w_q − w0‖ and its ΔNLL on the same windows (from the "
        f"quantization table's per-segment sums).",
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
            text += f" vs {np.interp(norm, stats.profile_radii, median):+.3f} along random directions at that distance"
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
        _require_kind(data, "scan")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.1,
                        subplot_titles=["1-D slices through w0", "2-D slice: span of the GPTQ and QAFT displacements"])
    for data in lines:
        role = data.provenance["slice"]
        r, y = data.arrays["coords/axis0"], data.arrays["nll"]
        color = METHOD_COLORS[role["method"]]
        fig.add_trace(go.Scatter(x=r, y=y, mode="lines+markers", name=f"along {role['label']}",
                                 line={"color": color, "dash": "dot" if role["method"] == "random" else "solid"},
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
    fig.add_trace(go.Scatter(x=[0.0, *(e["a"] for e in ends.values())], y=[0.0, *(e["b"] for e in ends.values())],
                             mode="markers+text", text=["w0", *ends], textposition="top center",
                             marker={"color": colors, "size": 13, "symbol": "star",
                                     "line": {"width": 1, "color": "white"}},
                             name="w0 and endpoints", showlegend=False), row=1, col=2)
    prov = plane.provenance
    model, caveat = _model_of(prov)
    fig.update_xaxes(title_text=DISTANCE_AXIS, row=1, col=1)
    fig.update_yaxes(title_text=NLL_AXIS, row=1, col=1)
    fig.update_xaxes(title_text="a: along the GPTQ displacement (weight units)", row=1, col=2)
    fig.update_yaxes(title_text="b: orthogonal, toward QAFT (weight units)", row=1, col=2)
    fmt = prov["slice"]["format"]
    fig.update_layout(title={"text": f"Slices through w0 of {model} along the GPTQ and QAFT {fmt} displacements",
                             "y": 0.98, "yanchor": "top"},
                      template="plotly_white", legend={"orientation": "h", "x": 0, "y": 1.08, "yanchor": "bottom"})
    return add_caption(fig, [
        "Left: NLL at w0 + r u for unit directions u: each displacement w_q − w0 (its endpoint, the quantized model, "
        "at r = ‖w_q − w0‖, star) and a random filter-normalised direction over the same distances as GPTQ's. "
        "Right: w0 + a u + b v with u = unit GPTQ displacement and v = the QAFT displacement made orthogonal to u "
        "(Gram-Schmidt) and unit: both endpoints lie in this plane.",
        nll_convention_sentence(prov["nll_convention"]), model_sentence(model, caveat)])


def reading_slices(lines: Sequence[StoreData], plane: StoreData) -> str:
    sentences = []
    center = None
    for data in lines:
        role, r, y = data.provenance["slice"], data.arrays["coords/axis0"], data.arrays["nll"]
        center = float(y[int(np.argmin(np.abs(r)))])
        if role.get("endpoint") is not None:
            end = int(np.argmin(np.abs(r - role["endpoint"])))
            sentences.append(f"along {role['label']} the NLL goes from {_num(center)} at w0 to {_num(float(y[end]))} "
                             f"at its endpoint (‖d‖ = {role['endpoint']:.4g})")
        else:
            sentences.append(f"along {role['label']} it reaches {_num(float(y[-1]))} at distance {float(r[-1]):.4g}")
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
    _require_kind(hessian, "curvature")
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
        error = ({"type": "data", "array": high - k, "arrayminus": k - low} if np.all(np.isfinite(low)) else None)
        line = {"color": METHOD_COLORS[method], "dash": "dot" if method == "random" else "solid"}
        fig.add_trace(go.Scatter(x=t, y=k, error_y=error, mode="lines+markers", name=f"along {label}", line=line),
                      row=1, col=2)
    model, caveat = _model_of(prov)
    fig.update_xaxes(title_text="eigenvalue (nats/token per squared weight unit)", row=1, col=1)
    fig.update_yaxes(title_text="density (log scale)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="t: the point w0 + t (w_q − w0) of the path (0: w0, 1: the quantized model)",
                     row=1, col=2)
    fig.update_yaxes(title_text="u^T H u, u = d/‖d‖ (nats/token per squared unit)", row=1, col=2)
    fig.update_layout(title=f"Curvature of the NLL of {model}: spectrum at w0 and along the quantization paths",
                      template="plotly_white")
    converged = "all converged" if spectrum.converged else "NOT all converged (few Lanczos steps)"
    s = prov["settings"]
    interval = f", {s['level']:.0%} bootstrap over batches." if s["level"] else "."
    return add_caption(fig, [
        f"Hessian of the token-mean NLL over the {spectrum.n_params:,} weights of the quantized linears. "
        f"Lanczos ({spectrum.lanczos_steps} steps, reorthogonalised; Ritz pairs {converged}); trace by "
        f"Hutch++ ({trace.n_matvecs} products): {trace.value:.4g} ± {trace.stderr:.2g}; density by "
        f"stochastic Lanczos "
        f"quadrature ({s['density_runs']} run(s) × {s['density_steps']} steps). Right: the Rayleigh quotient along "
        f"each displacement d (and a random filter-normalised direction of GPTQ's length) at w0 + t d{interval}",
        nll_convention_sentence(prov["nll_convention"]), model_sentence(model, caveat)])


def reading_curvature(hessian: StoreData) -> str:
    _require_kind(hessian, "curvature")
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
    """Per model ``(facts, basin, headline table)``: parameters, relative R(w0) quantiles and the GPTQ − QAFT gap."""
    points = []
    for facts, basin, table in models:
        _require_kind(facts, "model_facts")
        stats = basin_summary(basin)
        rows = quant_rows(table)
        gptq, qaft = _find(rows, "gptq", fmt), _find(rows, "qaft", fmt)
        if gptq is None or qaft is None:
            raise PlotError(f"the table of {table.provenance['model']} has no GPTQ and QAFT rows at {fmt}")
        q = stats.quantiles((0.1, 0.5, 0.9), relative=True)
        points.append({"model": facts.provenance["model"], "n_params": int(facts.arrays["n_params"]),
                       "caveat": facts.provenance["model_info"].get("caveat", ""), "radius": stats.median,
                       "relative_radius": q, "gap": gap_interval(gptq, qaft, "wiki"),
                       "gptq_norm_over_r": stats.displacement_norms.get(gptq["label"], math.nan) / stats.median})
    return sorted(points, key=lambda p: p["n_params"])


def model_size(models: Sequence[tuple[StoreData, StoreData, StoreData]], fmt: str) -> go.Figure:
    """R(w0) / ||w0|| (left) and the GPTQ − QAFT NLL gap at ``fmt`` (right) against the parameter count.

    ``models``: per model its ``(facts, basin, table)`` stores. Traces ``"R(w0) / ‖w0‖"`` (median, 10-90 %
    over directions) and ``"GPTQ − QAFT"`` (paired bootstrap interval), x = parameters.
    """
    points = size_points(models, fmt)
    x = [p["n_params"] for p in points]
    names = [p["model"] for p in points]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=["relative basin radius", f"GPTQ − QAFT NLL gap at {fmt} (wiki)"])
    rel = np.array([p["relative_radius"][0.5] for p in points])
    fig.add_trace(go.Scatter(
        x=x, y=rel, mode="lines+markers+text", text=names, textposition="top center", name="R(w0) / ‖w0‖",
        error_y={"type": "data", "array": [p["relative_radius"][0.9] for p in points] - rel,
                 "arrayminus": rel - [p["relative_radius"][0.1] for p in points]},
        line={"color": "#2ca02c"}, customdata=[[p["radius"], p["gptq_norm_over_r"]] for p in points],
        hovertemplate="%{text}: R/‖w0‖ = %{y:.4f}, R = %{customdata[0]:.4g}, ‖d_GPTQ‖ = %{customdata[1]:.2f} R"
                      "<extra></extra>"), row=1, col=1)
    gap = np.array([p["gap"].value for p in points])
    fig.add_trace(go.Scatter(
        x=x, y=gap, mode="lines+markers+text", text=names, textposition="top center", name="GPTQ − QAFT",
        error_y={"type": "data", "array": [p["gap"].high for p in points] - gap,
                 "arrayminus": gap - [p["gap"].low for p in points]}, line={"color": "#d62728"}), row=1, col=2)
    fig.add_hline(y=0, line={"color": "#888888", "width": 1}, row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(title_text="parameters (log scale)", type="log", row=1, col=col)
    fig.update_yaxes(title_text="R(w0) / ‖w0‖ (median, 10-90 % over directions)", row=1, col=1)
    fig.update_yaxes(title_text="NLL(GPTQ) − NLL(QAFT) (nats/token, 95 % paired bootstrap)", row=1, col=2)
    fig.update_layout(title="Basin radius and the GPTQ-QAFT gap against model size", template="plotly_white")
    caveats = [f"{p['model']}: {p['caveat']}" for p in points if p["caveat"]]
    basin = models[0][1].provenance
    return add_caption(fig, [
        f"R(w0): the radius where the held-out NLL first rises by {basin['search']['threshold']:g} nats along random "
        f"filter-normalised directions, relative to ‖w0‖ over the quantized linears. Gap: GPTQ minus QAFT on the "
        f"same held-out wiki windows, same calibration budget per model (sequence lengths capped at each model's "
        f"context; each model's NLL convention is in its stores).", "Caveats. " + " ".join(caveats)])


def reading_model_size(models: Sequence[tuple[StoreData, StoreData, StoreData]], fmt: str) -> str:
    points = size_points(models, fmt)
    parts = [f"{p['model']} ({p['n_params']:,} parameters): R/‖w0‖ = {100 * p['relative_radius'][0.5]:.3g} %, "
             f"GPTQ − QAFT = {p['gap'].value:+.3f} [{p['gap'].low:+.3f}, {p['gap'].high:+.3f}] nats" for p in points]
    return f"At {fmt}: " + "; ".join(parts) + "."
