"""What the figures share: labels and colours, reading quantization-table stores, and captions stated from
provenance (model and caveat, NLL convention, calibration budget)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from landscape.data import TEXT_PREFIX, corpus_label
from landscape.quant.formats import parse_format
from landscape.quant.methods import METHODS, QUANT_TABLE_METHODS
from landscape.stats import Interval, difference_interval
from landscape.store import StoreData
from landscape.studies.quant_table import quant_table_rows

# Every method's label from the registry, and the rows and lines that are not methods.
METHOD_LABELS: dict[str, str] = {"fp32": "fp32 (w0)", **{name: m.label for name, m in METHODS.items()},
                                 "dither": "dithered rounding", "random": "random direction"}
METHOD_COLORS: dict[str, str] = {
    "fp32": "#000000", "rtn": "#7f7f7f", "gptq": "#1f77b4", "gptq-noact": "#6baed6", "gptq+lorc": "#9467bd",
    "qaft": "#d62728", "fp-finetune": "#2ca02c", "dither": "#ff7f0e", "random": "#17becf",
}
QUANTIZED_METHODS = tuple(m for m in QUANT_TABLE_METHODS if m != "fp-finetune")  # the table's quantized rows
# Figure 2: each method labels its points on its own side, so labels of nearby points do not overlap.
LABEL_SIDE = {"fp32": "top center", "rtn": "middle left", "gptq": "top center", "gptq-noact": "bottom center",
              "gptq+lorc": "bottom center", "qaft": "middle right"}
CORPUS_TITLES = {"wiki": "in-domain: wiki held-out", "sotu": "out-of-domain: State of the Union"}


def corpus_title(corpus: str) -> str:
    """A subplot title for an evaluation corpus (a user's text: its file name, in-domain held-out)."""
    if corpus in CORPUS_TITLES:
        return CORPUS_TITLES[corpus]
    label = corpus_label(corpus)
    return f"in-domain: {label.removeprefix(TEXT_PREFIX)} held-out" if label != corpus else corpus
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def method_label(method: str, provenance: Mapping[str, Any] | None = None) -> str:
    """A method's label; the unquantized row (``fp32``, the table's key for w0) is named by the dtype the
    model ran in (``bf16 (w0)`` for a bfloat16 run; stores written before the dtype was recorded are
    float32)."""
    if method == "fp32":
        dtype = (provenance or {}).get("dtype") or "float32"
        return f"{DTYPE_SHORT.get(dtype, dtype)} (w0)"
    return METHOD_LABELS[method]
NLL_AXIS = "held-out NLL (nats/token)"
DISTANCE_AXIS = "distance from w0, ‖w − w0‖ (Euclidean, weight units)"
CAPTION_WIDTH = 170  # characters per caption line


class PlotError(ValueError):
    """Stores that cannot make the asked figure: wrong kind, unfinished, or mixing NLL conventions."""


# ------------------------------------------------------------------------------- reading stores
def quant_rows(data: StoreData) -> list[dict[str, Any]]:
    """The finished rows of a quantization-table store
    (:func:`landscape.studies.quant_table.run_quant_table`).

    Each row: ``label, method, format, seed``, ``bits_per_weight``, ``displacement_norm``, ``layer_mse_sum``,
    and per evaluation corpus ``nll``, ``nll_low``, ``nll_high``, ``segment_nll_sum``, ``segment_tokens``.
    Rows with quantized activations (``act_bits``) are left out: these figures compare weight quantization.
    """
    require_kind(data, "quant_table")
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
        require_same_evaluation(first, other.provenance)
    rows: dict[str, dict[str, Any]] = {}
    for data in tables:
        for row in quant_rows(data):
            rows.setdefault(row["label"], row)
    return list(rows.values())


def subset_nll(row: Mapping[str, Any], corpus: str, n_segments: int) -> float:
    """Token-mean NLL of a table row over its first ``n_segments`` evaluation windows (from stored sums)."""
    sums, tokens = row["segment_nll_sum"][corpus], row["segment_tokens"][corpus]
    if not 1 <= n_segments <= len(sums):
        raise PlotError(f"asked for the first {n_segments} segments of {row['label']}, the table "
                        f"has {len(sums)}")
    return float(np.sum(sums[:n_segments]) / np.sum(tokens[:n_segments]))


def gap_interval(a: Mapping[str, Any], b: Mapping[str, Any], corpus: str) -> Interval:
    """``NLL(a) - NLL(b)`` of two table rows with its paired 95 % bootstrap interval over the same windows."""
    return difference_interval(b["segment_nll_sum"][corpus], b["segment_tokens"][corpus],
                               a["segment_nll_sum"][corpus], a["segment_tokens"][corpus], paired=True)


def in_domain(table: StoreData) -> str:
    """A quantization table's in-domain evaluation corpus (the first of its protocol's)."""
    return table.provenance["protocol"]["eval_corpora"][0]


def require_kind(data: StoreData, kind: str) -> None:
    found = data.provenance.get("kind")
    if found != kind:
        raise PlotError(f"expected a {kind!r} store, got a {found!r} store")
    if not data.done.any():
        raise PlotError(f"the {kind!r} store holds no finished point")


def require_same_evaluation(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if a.get("model_fingerprint") != b.get("model_fingerprint"):
        raise PlotError(f"tables of different models: {a.get('model')!r} ({a.get('model_fingerprint')}) and "
                        f"{b.get('model')!r} ({b.get('model_fingerprint')})")
    hashes = [{c: e["data_hash"] for c, e in p["evaluation"].items()} for p in (a, b)]
    if hashes[0] != hashes[1]:
        raise PlotError(f"tables evaluated on different data ({hashes[0]} vs {hashes[1]}): their NLLs "
                        f"do not compare")


def find_row(rows: Sequence[Mapping[str, Any]], method: str,
             fmt: str | None = None) -> Mapping[str, Any] | None:
    for row in rows:
        if row["method"] == method and (fmt is None or row["format"] == fmt):
            return row
    return None


# ---------------------------------------------------------------------------------------- captions
def wrap(text: str) -> str:
    return "<br>".join(textwrap.wrap(text, CAPTION_WIDTH, break_on_hyphens=False))


def add_caption(fig: go.Figure, paragraphs: Sequence[str]) -> go.Figure:
    """Put ``paragraphs`` below the plot as one annotation named ``caption`` (and make room for it)."""
    text = "<br>".join(wrap(p) for p in paragraphs if p)
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
    parts = [f"{corpus_label(c)}/{e['split']} {e['n_segments']} × {e['seq_len']} tokens (stride "
             f"{e['stride']}, {e['n_scored_tokens']:,} scored tokens, data {e['data_hash']})"
             for c, e in ((c, provenance["evaluation"][c]) for c in p["eval_corpora"])]
    cal = provenance["calibration"]
    return (f"NLL: token-mean nats per scored token over disjoint windows of {'; '.join(parts)}. "
            f"Error bars: 95 % bootstrap over segments. Every method uses the same {cal['n_segments']} "
            f"calibration sequences × {cal['seq_len']} tokens ({corpus_label(cal['corpus'])}/{cal['split']}, "
            f"seed {cal['seed']}, data {cal['data_hash']}) and the same min-max grid of w0 per layer; GPTQ "
            f"with act-order (gptq-noact: without; every saved quantized model records its settings); QAFT: "
            f"straight-through estimator, AdamW lr {p['qaft_lr']:g}, {p['qaft_epochs']:g} epoch(s) in "
            f"batches of {p['qaft_batch_size']}; LoRC rank {p['lorc_rank']}.")


def nll_convention_sentence(convention: Mapping[str, Any] | str | None) -> str:
    """An :class:`~landscape.objectives.NLLConvention` dict in words (a store that records its convention as
    a sentence, such as a quantization table whose corpora each have their own windows, gives it as is)."""
    if not convention:
        return ""
    if isinstance(convention, str):
        return f"NLL: {convention.removeprefix('NLL: ')}"
    c = convention
    return (f"NLL: token-mean nats per scored token on {corpus_label(c['corpus'])}/{c['split']} "
            f"{c['n_segments']} × {c['seq_len']} tokens (stride {c['stride']}, {c['n_tokens']:,} scored "
            f"tokens, data {c['data_hash']}).")


def model_of(provenance: Mapping[str, Any]) -> tuple[str, str]:
    info = provenance.get("model_info") or {}
    return (provenance.get("model") or info.get("name", "?"),
            provenance.get("model_caveat") or info.get("caveat", ""))


def granularity_of(fmt: str) -> str:
    f = parse_format(fmt)
    base = {"channel": "per-channel", "tensor": "per-tensor"}.get(f.granularity) or \
        (f"g{f.group_size}" if f.granularity == "group" else f"MX block {f.group_size}")
    return base + (" sym" if f.symmetric and f.granularity != "mx" else "") + (" fz" if f.float_zero else "")


def num(x: float) -> str:
    """Three decimals for NLL-sized numbers, three significant digits otherwise."""
    return f"{x:.3f}" if 0.1 <= abs(x) < 100 else f"{x:.3g}"
