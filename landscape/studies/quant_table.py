"""The quantization study: every method on every format under one protocol, into one HDF5 store.

A :class:`Protocol` fixes everything that defines the numbers: the model, the calibration budget (128
sequences, seeded, from ``wiki`` or a user's text), the evaluation sets (in-domain, by default ``wiki``,
and out-of-domain ``sotu``, same convention), the formats, the methods and their settings.
:func:`run_quant_table` then

1. quantizes with each method of the registry (:mod:`landscape.quant.methods`: ``rtn``, ``gptq`` with
   act-order, ``gptq-noact``, ``gptq+lorc``, ``qaft``, and the full-precision control ``fp-finetune``: the
   QAFT loop with the same settings and the quantizer off), saving every
   :class:`~landscape.quant.result.QuantResult` so nothing is ever recomputed;
2. evaluates each variant's NLL on every evaluation corpus with a 95 % bootstrap interval over segments
   (the per-segment sums are stored, so paired differences can be computed later from the store alone);
3. writes one point per variant to a resumable store (a killed run continues where it stopped).

Figures and reports read the store only (:func:`read_quant_table`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.cluster import shard_store_path
from landscape.data import calibration_set, check_corpus_name, corpus_label, heldout_set
from landscape.memory import release_freed_memory
from landscape.models import LoadedModel, load_model
from landscape.objectives import layer_mse, nll
from landscape.quant.activations import quantized_activations
from landscape.quant.formats import parse_format
from landscape.quant.methods import METHODS, QUANT_TABLE_METHODS, QuantJob, run_method
from landscape.quant.qaft import DEFAULT_LR, FinetuneSettings
from landscape.quant.result import QuantResult
from landscape.stats import ControlAdjustedGap, control_gaps, nll_interval
from landscape.store import (
    StoreData,
    check_store_path,
    model_provenance,
    read_store,
    start_run,
    with_shard,
)
from landscape.weights import quantizable_layers, swapped_weights, weight_matrix

FP32 = "fp32"


@dataclass(frozen=True)
class Protocol:
    """Everything that defines the study's numbers. Stored as the store's provenance.

    Attributes:
        model: model name (:func:`landscape.models.load_model`).
        calib_sequences, calib_seq_len, calib_seed: the calibration budget (the same for every method).
        calib_corpus: the calibration text (its training split): ``wiki`` or a user's ``text:PATH``
            (:func:`landscape.data.text_corpus`), whose held-out split is then the in-domain evaluation set.
        eval_corpora, eval_seq_len, eval_segments: held-out evaluation (token-mean NLL, disjoint windows).
        formats: weight formats (:func:`landscape.quant.parse_format` names).
        methods: subset of the registry's table methods (:data:`landscape.quant.methods.QUANT_TABLE_METHODS`,
            in their order by default); ``fp-finetune`` is paired with each ``qaft`` run.
        seeds: seeds of the stochastic methods (QAFT and its control); deterministic methods use one.
        qaft_lr, qaft_epochs, qaft_batch_size: QAFT (and control) settings: one :class:`FinetuneSettings`
            per seed, the same for QAFT and its control.
        qaft_micro_batch_size: sequences per forward and backward pass of QAFT and its control (memory only,
            equal up to float rounding; ``None``: the whole batch).
        qaft_recompute_blocks: recompute each decoder block in QAFT's backward passes (memory only, the same
            bits; not part of the table's identity: see :class:`~landscape.quant.qaft.FinetuneSettings`).
        lorc_rank: rank of LoRC's correction.
        act_bits: extra variants evaluated with per-token activation fake quantization at these bits
            on top of the GPTQ weights (e.g. ``((4, 8),)`` for W4A8: (weight bits, activation bits)).
        layer_mse_sequences: the first calibration sequences on which the table's summed layer MSE is
            measured, for every variant the same way (inputs of the full-precision model); None: all.
            Each measurement is a forward pass over them, so fewer cost less.
    """

    model: str = "smollm2-135m"
    calib_sequences: int = 128
    calib_seq_len: int = 512
    calib_seed: int = 0
    calib_corpus: str = "wiki"
    eval_corpora: tuple[str, ...] = ("wiki", "sotu")
    eval_seq_len: int = 512
    eval_segments: int = 24
    formats: tuple[str, ...] = ("int4", "int3")
    methods: tuple[str, ...] = QUANT_TABLE_METHODS
    seeds: tuple[int, ...] = (0,)
    qaft_lr: float = DEFAULT_LR
    qaft_epochs: float = 1.0
    qaft_batch_size: int = 4
    qaft_micro_batch_size: int | None = None
    qaft_recompute_blocks: bool = False
    lorc_rank: int = 8
    act_bits: tuple[tuple[int, int], ...] = ()
    layer_mse_sequences: int | None = None

    def __post_init__(self) -> None:
        for corpus in (self.calib_corpus, *self.eval_corpora):
            check_corpus_name(corpus)
        labels = [corpus_label(c) for c in self.eval_corpora]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"eval_corpora must be distinct and not empty, got {self.eval_corpora}")
        for f in self.formats:
            parse_format(f)  # raises FormatError naming the bad format
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; valid: {QUANT_TABLE_METHODS}")
        elsewhere = set(self.methods) - set(QUANT_TABLE_METHODS)
        if elsewhere:
            raise ValueError(f"methods {sorted(elsewhere)} do not run in the quantization table (its result "
                             f"keys name the settings of {QUANT_TABLE_METHODS} only)")
        if "fp-finetune" in self.methods and "qaft" not in self.methods:
            raise ValueError("fp-finetune is the paired control of qaft: include 'qaft' too")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        n = self.layer_mse_sequences
        if n is not None and (isinstance(n, bool) or not isinstance(n, int)
                              or not 1 <= n <= self.calib_sequences):
            raise ValueError(f"layer_mse_sequences must be None (all) or an integer in 1..calib_sequences="
                             f"{self.calib_sequences}, got {n!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.qaft_micro_batch_size is None:  # recorded only when set: older stores still match
            del d["qaft_micro_batch_size"]
        if self.calib_corpus == "wiki":  # likewise
            del d["calib_corpus"]
        del d["qaft_recompute_blocks"]  # how memory is spent, not what is computed
        return d


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method at a format (and seed), optionally with quantized activations."""

    method: str
    format: str | None
    seed: int = 0
    act_bits: int | None = None

    @property
    def label(self) -> str:
        if self.method == FP32:
            return FP32
        s = f"{self.method} {self.format}"
        if self.act_bits:
            s += f" A{self.act_bits}"
        if _seeded(self.method):
            s += f" s{self.seed}"
        return s

    @property
    def key(self) -> str:
        return self.label.replace(" ", "_")


def variants(protocol: Protocol) -> list[Variant]:
    """Rows of the table, in a fixed order: fp32, then per format each method (and seed)."""
    rows = [Variant(FP32, None)]
    for fmt in protocol.formats:
        for method in protocol.methods:
            seeds = protocol.seeds if _seeded(method) else (0,)
            rows += [Variant(method, parse_format(fmt).name, s) for s in seeds]
    for w_bits, a_bits in protocol.act_bits:
        rows.append(Variant("gptq", parse_format(f"int{w_bits}").name, 0, a_bits))
    return rows


def _seeded(method: str) -> bool:
    """Whether the registry's ``method`` trains from a seeded data order (one table row per seed)."""
    return method in METHODS and METHODS[method].seeded


@dataclass
class _Context:
    lm: LoadedModel
    protocol: Protocol
    calib: Any
    mse_calib: Any  # the calibration sequences of every variant's layer MSE
    results_dir: Path
    fingerprint: str
    progress: bool


def _quantized(ctx: _Context, v: Variant) -> QuantResult:
    """The QuantResult of a variant: from disk, or computed now (and saved). Never kept in memory after its
    use: a table's finished results would otherwise pile up beside QAFT's training state (SmolLM2's int3 table
    peaked at 6.3 GB), and reading one back costs about a second."""
    key = result_key(ctx.protocol, v)
    # Saved results are keyed by the calibration data too: a result is reused only under the same budget.
    path = result_path(ctx.results_dir.parent, ctx.protocol, v, ctx.calib.content_hash)
    if path.with_name(key + ".json").exists():
        result = QuantResult.load(path, base_fingerprint=ctx.fingerprint, base=ctx.lm.base)
    else:
        result = run_method(v.method, _job(ctx, v))
        result.save(path, overwrite=True)  # no .json: at most the tensors of a run killed while saving
    return result


def _job(ctx: _Context, v: Variant) -> QuantJob:
    """What the registry's runner of ``v.method`` needs: the protocol's settings, ``v``'s format and seed.

    RTN and LoRC leave their layer MSE to :func:`_measure`; a method built on another (``gptq+lorc``) gets
    that method's result from :func:`_quantized`, saved and reused.
    """
    p = ctx.protocol
    settings = FinetuneSettings(lr=p.qaft_lr, epochs=p.qaft_epochs, batch_size=p.qaft_batch_size, seed=v.seed,
                                micro_batch_size=p.qaft_micro_batch_size,
                                recompute_blocks=p.qaft_recompute_blocks)

    def result_of(method: str) -> QuantResult:
        return _quantized(ctx, Variant(method, v.format, v.seed if _seeded(method) else 0))

    return QuantJob(ctx.lm.base, ctx.calib, v.format, finetune=settings, lorc_rank=p.lorc_rank,
                    mse_data=ctx.mse_calib, measure_layer_mse=False, progress=ctx.progress, results=result_of)


def task_group(p: Protocol, v: Variant) -> str:
    """The saved result a row is computed from (``gptq+lorc`` and a W4A8 row from GPTQ's): rows of one group
    go to the same job of a sharded run, so no result is computed twice, even across protocols."""
    if v.method == "gptq+lorc" or v.act_bits:
        return result_key(p, Variant("gptq", v.format, 0))
    return FP32 if v.method == FP32 else result_key(p, v)


def task_groups(protocols: Sequence[Protocol]) -> list[str]:
    """Every group of the rows of ``protocols``, in order of first appearance: shard ``i`` of ``n`` of a run
    of these protocols computes the groups at positions ``i, i + n, ...``."""
    return list(dict.fromkeys(task_group(p, v) for p in protocols for v in variants(p)))


def result_key(p: Protocol, v: Variant) -> str:
    """File name of a variant's QuantResult: the method, the format and every setting that changes it.

    The full-precision control's key has no format: it is the QAFT loop with the quantizer off (same
    data, seed, batches, steps and layers), so its weights do not depend on the format it is paired with
    (tested bit-exactly), and one control is trained per seed and shared by every format's table.
    """
    micro = "" if p.qaft_micro_batch_size is None else f"-mb{p.qaft_micro_batch_size}"
    training = f"lr{p.qaft_lr:g}-e{p.qaft_epochs:g}-b{p.qaft_batch_size}{micro}-s{v.seed}"
    if v.method == "fp-finetune":  # the control never quantizes: one result serves every format
        return f"{v.method}-{training}"
    if v.method == "qaft":
        return f"{v.method}-{v.format}-{training}"
    if v.method == "gptq+lorc":
        return f"{v.method}-{v.format}-r{p.lorc_rank}"
    return f"{v.method}-{v.format}"


def _arrays(protocol: Protocol) -> dict[str, tuple[tuple[int, ...], str]]:
    arrays: dict[str, tuple[tuple[int, ...], str]] = {
        "seconds": ((), "f8"), "layer_mse_sum": ((), "f8"), "displacement_norm": ((), "f8"),
        "bits_per_weight": ((), "f8"),
    }
    for c in map(corpus_label, protocol.eval_corpora):
        arrays |= {f"nll/{c}": ((), "f8"), f"nll_low/{c}": ((), "f8"), f"nll_high/{c}": ((), "f8"),
                   f"segment_nll_sum/{c}": ((protocol.eval_segments,), "f8"),
                   f"segment_tokens/{c}": ((protocol.eval_segments,), "i8")}
    return arrays


def check_formats_fit(model: nn.Module, protocols: Sequence[Protocol]) -> None:
    """Raise ``FormatError`` before any work unless every format of every protocol can quantize every
    quantizable layer of ``model`` (e.g. a group size that divides each layer's in_features): otherwise a
    run would fail at its first impossible format, after the tables before it."""
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    for fmt in dict.fromkeys(f for protocol in protocols for f in protocol.formats):
        for name, shape in shapes.items():
            parse_format(fmt).check_shape(shape, name)


def run_quant_table(protocol: Protocol, out_dir: str | Path, progress: bool = True,
                    lm: LoadedModel | None = None, name: str = "quant_table",
                    shard: tuple[int, int] = (0, 1), groups: Sequence[str] | None = None) -> Path:
    """Run (or resume) the study of ``protocol``; returns the path of the finished store ``<name>.h5``.

    Quantized models are saved under ``out_dir/results/`` (keyed by calibration data, method, format and
    settings) and reused, also by other protocols run into the same ``out_dir``; the store gets one
    point per :func:`variants` row, each flushed as soon as it is measured.

    With ``shard=(i, n)``, only the rows of the groups at positions ``i, i + n, ...`` of ``groups`` (default
    :func:`task_groups` of this protocol; pass the list of every protocol run together) are measured, into
    :func:`landscape.cluster.shard_store_path` of ``<name>.h5``, whose path is returned.
    """
    out_dir = Path(out_dir)
    index, count = shard
    store_path = out_dir / f"{name}.h5"
    if count > 1:
        store_path = shard_store_path(store_path, index, count)
    check_store_path(store_path, resume=True)  # an unwritable location fails before any work
    lm = lm or load_model(protocol.model)
    check_formats_fit(lm.model, [protocol])
    tok, ctx_len = lm.tokenizer, lm.info.context_length
    calib = calibration_set(tok, protocol.calib_sequences, protocol.calib_seq_len, protocol.calib_seed,
                            protocol.calib_corpus, context_length=ctx_len)
    evals = {c: heldout_set(tok, protocol.eval_seq_len, c, protocol.eval_segments, context_length=ctx_len)
             for c in protocol.eval_corpora}
    for c, data in evals.items():
        if data.n_segments != protocol.eval_segments:
            raise ValueError(f"corpus {c!r} has only {data.n_segments} segments of {protocol.eval_seq_len} "
                             f"tokens; the protocol asks for {protocol.eval_segments}")
    fingerprint = lm.base.fingerprint()
    rows = variants(protocol)
    mse_calib = (calib if protocol.layer_mse_sequences is None
                 else calib.subset(range(protocol.layer_mse_sequences)))
    provenance = {
        "kind": "quant_table",
        "protocol": protocol.to_dict(),
        **model_provenance(lm.base),
        "model_caveat": lm.info.caveat,
        "calibration": calib.provenance(),
        "evaluation": {c: d.provenance() for c, d in evals.items()},
        "nll_convention": "token-mean nats per scored token over disjoint windows (stride = seq_len)",
        "layer_mse_convention": f"sum over layers of mean (W x - W' x)^2, x: inputs of the full-precision "
                                f"model on the first {mse_calib.n_segments} calibration sequences",
        "variants": [r.label for r in rows],
    }
    order = {g: k for k, g in enumerate(groups if groups is not None else task_groups([protocol]))}
    unassigned = sorted({task_group(protocol, v) for v in rows} - set(order))
    if unassigned:
        raise ValueError(f"groups {unassigned} of {name} are not in the shard order: pass task_groups() of "
                         f"every protocol run together")
    mine = [order[task_group(protocol, v)] % count == index for v in rows]
    ctx = _Context(lm, protocol, calib, mse_calib, out_dir / "results", fingerprint, progress)
    # views of the model's own weights, not a copy: every method leaves the model at w0 (QAFT never writes
    # them, GPTQ restores what it installs), and a row reads them before swapping its weights in
    w0 = {n: weight_matrix(m).detach() for n, m in quantizable_layers(lm.model).items()}
    w0_norm = float(torch.sqrt(sum(w.double().pow(2).sum() for w in w0.values())))
    store = start_run(store_path, with_shard(provenance, shard), _arrays(protocol), (len(rows),), resume=True)
    try:
        if store.writable:  # (re)written on every resume: both are functions of the protocol only
            store.write_array("w0_norm", np.float64(w0_norm))
            store.write_table("variants",
                              {"label": [r.label for r in rows], "method": [r.method for r in rows],
                               "format": [r.format or "" for r in rows],
                               "seed": [r.seed for r in rows], "act_bits": [r.act_bits or 0 for r in rows]})
        todo = [i for i in range(len(rows)) if mine[i] and not store.done[i]]
        for i in tqdm(todo, desc=f"quant table {lm.info.name}", disable=not progress):
            store.write_point(i, _measure(ctx, rows[i], evals, w0))
            release_freed_memory()  # the variant's freed tensors go back to the system before the next one
        return store.finish()
    finally:
        store.close()


def _measure(ctx: _Context, v: Variant, evals: dict, w0: dict[str, torch.Tensor]) -> dict[str, Any]:
    t0 = time.time()
    result = None if v.method == FP32 else _quantized(ctx, v)
    release_freed_memory()  # what quantizing freed (GPTQ: 2 GB of heap) goes back before the measurements
    weights = result.weights if result else {}
    # One convention for every row (GPTQ's own layer_mse is on sequentially quantized inputs, QAFT's on
    # its training data): the first layer_mse_sequences calibration sequences, full-precision inputs.
    mse = (sum(layer_mse(ctx.lm.model, ctx.mse_calib, weights, inputs="reference").values()) if weights
           else 0.0)
    values: dict[str, Any] = {
        "seconds": result.seconds if result else 0.0,
        "layer_mse_sum": float(mse),
        "displacement_norm": float(torch.sqrt(sum((weights[n].double() - w0[n].double()).pow(2).sum()
                                                  for n in weights))) if result else 0.0,
        "bits_per_weight": _bits_per_weight(result, w0),
    }
    with swapped_weights(ctx.lm.model, weights), quantized_activations(ctx.lm.model, v.act_bits):
        for corpus, data in evals.items():
            r = nll(ctx.lm.model, data, batch_size=4, model_name=ctx.lm.info.name)
            ci, c = nll_interval(r), corpus_label(corpus)
            values |= {f"nll/{c}": r.value, f"nll_low/{c}": ci.low, f"nll_high/{c}": ci.high,
                       f"segment_nll_sum/{c}": r.segment_nll_sum, f"segment_tokens/{c}": r.segment_tokens}
    if ctx.progress:
        nlls = ", ".join(f"{c} {values[f'nll/{c}']:.4f}" for c in map(corpus_label, evals))
        print(f"  {v.label:<28} {nlls}  ({time.time() - t0:.0f} s eval)", flush=True)
    return values


def _bits_per_weight(result: QuantResult | None, w0: dict[str, torch.Tensor]) -> float:
    """Storage bits per weight of the quantized layers (fp32: 16, the half-precision deployment baseline)."""
    if result is None or result.format is None:
        return 16.0
    return result.storage_bits() / sum(w0[n].numel() for n in result.weights)


# ------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class QuantTable:
    """The study's table as read from its store (written row by row by :func:`run_quant_table`)."""

    rows: list[dict[str, Any]]
    provenance: dict[str, Any]
    complete: bool

    @classmethod
    def from_store(cls, path: str | Path) -> QuantTable:
        """The finished rows and provenance of a quant-table store (finished or partial)."""
        return read_quant_table(path)

    def markdown(self) -> str:
        corpora = self.provenance["protocol"]["eval_corpora"]
        head = "| variant | " + " | ".join(f"NLL {c} [95 % CI]" for c in corpora) + \
               " | ‖w_q − w0‖ | layer-MSE sum | bits/weight | seconds |"
        lines = [head, "|" + "---|" * (5 + len(corpora))]
        for r in self.rows:
            cells = [f"{r['nll'][c]:.4f} [{r['nll_low'][c]:.3f}, {r['nll_high'][c]:.3f}]" for c in corpora]
            lines.append(f"| {r['label']} | " + " | ".join(cells) +
                         f" | {r['displacement_norm']:.1f} | {r['layer_mse_sum']:.3g} | "
                         f"{r['bits_per_weight']:.2f} | {r['seconds']:.0f} |")
        return "\n".join(lines)


def read_quant_table(path: str | Path) -> QuantTable:
    """Rows (one dict per finished variant) and provenance of a quant-table store (finished or partial)."""
    data = read_store(path)
    if data.provenance.get("kind") != "quant_table":
        raise ValueError(f"{path} holds a {data.provenance.get('kind')!r} run, not a quant table")
    return QuantTable(quant_table_rows(data), data.provenance, data.complete)


def quant_table_rows(data: StoreData) -> list[dict[str, Any]]:
    """The finished rows of a quant-table store's data, in table order.

    Each row: ``label, method, format, seed, act_bits``, ``seconds``, ``layer_mse_sum``,
    ``displacement_norm``, ``bits_per_weight``, and per evaluation corpus (dicts keyed by corpus) ``nll``,
    ``nll_low``, ``nll_high`` (floats), ``segment_nll_sum`` and ``segment_tokens`` (arrays).
    """
    table = data.table("variants")
    corpora = data.provenance["protocol"]["eval_corpora"]
    rows = []
    for i, label in enumerate(table["label"]):
        if not data.done[i]:
            continue
        row: dict[str, Any] = {"label": str(label), "method": str(table["method"][i]),
                               "format": str(table["format"][i]), "seed": int(table["seed"][i]),
                               "act_bits": int(table["act_bits"][i])}
        for k in ("seconds", "layer_mse_sum", "displacement_norm", "bits_per_weight"):
            row[k] = float(data.arrays[k][i])
        for k in ("nll", "nll_low", "nll_high"):
            row[k] = {c: float(data.arrays[f"{k}/{corpus_label(c)}"][i]) for c in corpora}
        for k in ("segment_nll_sum", "segment_tokens"):
            row[k] = {c: data.arrays[f"{k}/{corpus_label(c)}"][i] for c in corpora}
        rows.append(row)
    return rows


def result_path(out_dir: str | Path, protocol: Protocol, variant: Variant, calibration_hash: str) -> Path:
    """Where :func:`run_quant_table` saves a variant's QuantResult (without the .json/.safetensors
    extension)."""
    return Path(out_dir) / "results" / f"calib-{calibration_hash}" / result_key(protocol, variant)


def table_control_gaps(rows: Sequence[Mapping[str, Any]], corpora: Sequence[str]) -> list[ControlAdjustedGap]:
    """Per format with GPTQ, QAFT and the fine-tuning control (and fp32), per corpus: QAFT's advantage over
    GPTQ and how much of it remains after the control (:func:`landscape.stats.control_gaps`; seeds averaged),
    from the rows of one or more quantization tables on the same evaluation windows
    (:func:`quant_table_rows`)."""
    fp32 = next((r for r in rows if r["method"] == FP32), None)
    if fp32 is None:
        return []
    per_corpus = {c: {g.format: g for g in control_gaps(
        [(r["method"], r["format"], r["segment_nll_sum"][c]) for r in rows], fp32["segment_nll_sum"][c],
        fp32["segment_tokens"][c], c)} for c in corpora}
    formats = dict.fromkeys(r["format"] for r in rows if r["method"] == "qaft")
    return [per_corpus[c][f] for f in formats for c in corpora if f in per_corpus[c]]
