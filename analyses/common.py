"""What every analysis script shares: protocol profiles, arguments, the plan of measurements, publishing.

* A :class:`Profile` fixes every size of the study (calibration budget, evaluation tokens, formats,
  directions, grids, Lanczos steps...). Three exist: ``quick`` (``make figures``: SmolLM2-135M in well
  under an hour on 2 CPU cores), ``full`` (``make figures-full``: the full protocol, hours on CPU) and
  ``tiny`` (tests and smoke runs on ``ref-tiny``: seconds).
* A :class:`Step` is one measurement that writes one HDF5 store. Its path holds a hash of everything
  that defines its numbers (:meth:`Session.store_path`), so a store that exists is the finished
  measurement of exactly these settings and is skipped: a rerun loads no model and takes seconds, and
  a changed setting writes a new store instead of mixing results.
* Figures are built from stores only (:mod:`landscape.plots`) and published with :func:`publish`:
  offline HTML (plotly.js once per folder, fixed div ids, so reruns are byte-identical) and a PNG when
  kaleido and Chromium are available.

Cost estimates (:class:`Costs`) are measured on 2 CPU cores with SmolLM2-135M (``shared/FIELD_NOTES.md``)
and scaled by parameter count for other models: they make the printed plan, not the results.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import plotly.graph_objects as go

from landscape.cache import stable_hash
from landscape.quant.methods import QUANT_TABLE_METHODS
from landscape.studies.quant_table import Protocol

PROFILE_NAMES = ("quick", "full", "tiny")
SMOLLM2_PARAMETERS = 134_515_008


# ------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class TableSpec:
    """One quantization table: every method in ``methods`` at every format in ``formats`` (one store)."""

    formats: tuple[str, ...]
    methods: tuple[str, ...]


@dataclass(frozen=True)
class MisalignmentSettings:
    """Figure 3: candidates beyond the quantization tables, and how their layer MSE is measured.

    Attributes:
        formats: formats of the dithered on-grid roundings (each also contributes its table methods).
        strengths: dither strengths ``s`` of ``round(w0 / scale + zero + s (u - 1/2))``, ``u ~ U[0, 1)``:
            1 is stochastic rounding, 0 would be RTN.
        seeds: seeds of the dither (one candidate per format, strength and seed).
        mse_sequences: the first calibration sequences on which every candidate's layer MSE is measured.
    """

    formats: tuple[str, ...]
    strengths: tuple[float, ...]
    seeds: tuple[int, ...]
    mse_sequences: int


@dataclass(frozen=True)
class BasinSettings:
    """Figure 4 (and 7): R(w0) along random filter-normalised directions.

    Attributes:
        n_directions: random directions (seeds 0 .. n - 1).
        profile_fractions: radii of the regular radial profile, as fractions of ``||w0||``.
        threshold: NLL rise (nats) that leaves the basin; tolerance: relative bracket width of the bisection.
        initial_fraction: first radius of the bracketing, as a fraction of ``||w0||``.
        segments: the first held-out wiki segments the NLL is measured on.
    """

    n_directions: int
    profile_fractions: tuple[float, ...]
    threshold: float
    tolerance: float
    initial_fraction: float
    segments: int


@dataclass(frozen=True)
class SliceSettings:
    """Figure 5: slices through w0 spanned by the GPTQ and QAFT displacements (headline format).

    Attributes:
        points_1d: points of each 1-D slice, ``t`` from -0.5 to 1.5 (``t = 1``: the endpoint; keep
            ``points_1d - 1`` divisible by 4 so that 0 and 1 lie on the grid).
        points_2d: points per axis of the 2-D slice.
        segments: the first held-out wiki segments the NLL is measured on.
        random_seed: seed of the random filter-normalised comparison direction.
    """

    points_1d: int
    points_2d: int
    segments: int
    random_seed: int = 0


@dataclass(frozen=True)
class CurvatureSettings:
    """Figure 6: Hessian of the held-out wiki NLL at w0 and along each displacement.

    Attributes:
        segments, seq_len: the held-out wiki tokens of every Hessian-vector product (batch 1 segment).
        k_top, k_bottom: Lanczos eigenpairs at each end; lanczos_steps: Krylov dimension.
        trace_matvecs: Hutch++ budget; density_runs, density_steps: stochastic Lanczos quadrature.
        path_t: points ``w0 + t d`` where the Rayleigh quotient along ``d`` is measured.
        level: interval coverage over batches (None: no interval; needs >= 2 segments).
        random_seed: seed of the random filter-normalised comparison path (scaled to GPTQ's length).
    """

    segments: int
    seq_len: int
    k_top: int
    k_bottom: int
    lanczos_steps: int
    trace_matvecs: int
    density_runs: int
    density_steps: int
    path_t: tuple[float, ...]
    level: float | None = None
    random_seed: int = 0


@dataclass(frozen=True)
class Profile:
    """Every size of one protocol. Token counts are ``segments x tokens per segment``.

    Attributes:
        name: ``quick``, ``full`` or ``tiny``.
        model: the model of figures 1-6 (``--model`` overrides it).
        calib_sequences, calib_seq_len: the calibration budget, the same for every method (paper: 128).
        eval_segments, eval_seq_len, eval_corpora: held-out NLL (in-domain ``wiki``, out-of-domain ``sotu``).
        tables: the quantization tables; ``tables[0]`` holds the headline format with QAFT, LoRC and the
            full-precision fine-tuning control.
        headline_format: the format of figures 3 (with the others), 4, 5, 6 and 7.
        qaft_lr, qaft_epochs, qaft_batch_size: QAFT and its control; lorc_rank: LoRC's rank.
        size_models: further models of figure 7 (``ref-small`` only if already built).
    """

    name: str
    model: str
    calib_sequences: int
    calib_seq_len: int
    eval_segments: int
    eval_seq_len: int
    eval_corpora: tuple[str, ...]
    tables: tuple[TableSpec, ...]
    headline_format: str
    qaft_lr: float
    qaft_epochs: float
    qaft_batch_size: int
    lorc_rank: int
    misalignment: MisalignmentSettings
    basin: BasinSettings
    slices: SliceSettings
    curvature: CurvatureSettings
    size_models: tuple[str, ...]

    def __post_init__(self) -> None:
        headline = self.tables[0] if self.tables else None
        if headline is None or self.headline_format not in headline.formats or \
                not {"rtn", "gptq", "qaft"} <= set(headline.methods):
            raise ValueError(f"profile {self.name!r}: tables[0] must hold the headline format "
                             f"{self.headline_format!r} with rtn, gptq and qaft; got {headline}")
        if "wiki" not in self.eval_corpora:
            raise ValueError(f"profile {self.name!r}: eval_corpora must include 'wiki' (figures 3-7 use it), "
                             f"got {self.eval_corpora}")
        for what, n in (("basin", self.basin.segments), ("slices", self.slices.segments)):
            if not 1 <= n <= self.eval_segments:
                raise ValueError(f"profile {self.name!r}: {what}.segments={n} must be in 1..eval_segments="
                                 f"{self.eval_segments} (they are the first evaluation segments)")
        if (self.slices.points_1d - 1) % 4:
            raise ValueError(f"profile {self.name!r}: slices.points_1d={self.slices.points_1d} must be 1 + a "
                             f"multiple of 4, so that t = 0 and t = 1 lie on the grid -0.5 .. 1.5")
        if not 1 <= self.misalignment.mse_sequences <= self.calib_sequences:
            raise ValueError(f"profile {self.name!r}: misalignment.mse_sequences must be in 1..calib_sequences")
        for spec in self.tables:
            try:
                Protocol(formats=spec.formats, methods=spec.methods)
            except ValueError as err:
                raise ValueError(f"profile {self.name!r}: table {spec.formats} x {spec.methods}: {err}") from None

    def for_model(self, model: str) -> Profile:
        """This profile for ``model``, with every sequence length capped at the model's context length."""
        limit = context_limit(model)
        if limit is None:
            return replace(self, model=model)
        return replace(self, model=model, calib_seq_len=min(self.calib_seq_len, limit),
                       eval_seq_len=min(self.eval_seq_len, limit),
                       curvature=replace(self.curvature, seq_len=min(self.curvature.seq_len, limit)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Profile(
    name="quick", model="smollm2-135m",
    calib_sequences=128, calib_seq_len=256, eval_segments=16, eval_seq_len=256, eval_corpora=("wiki", "sotu"),
    tables=(TableSpec(("int3",), ("rtn", "gptq", "gptq+lorc", "qaft", "fp-finetune")),
            TableSpec(("int4",), ("rtn", "gptq", "qaft")),
            # GPTQ of all 210 linears costs about 4 min per format on 2 cores: the group formats, 8 and 2 bits
            # get RTN only in quick mode (make figures-full runs GPTQ at every format).
            TableSpec(("int4-g64", "int3-g64", "int8", "int2"), ("rtn",))),
    headline_format="int3", qaft_lr=3e-4, qaft_epochs=1.0, qaft_batch_size=4, lorc_rank=8,
    misalignment=MisalignmentSettings(formats=("int4", "int3"), strengths=(0.5, 1.0), seeds=(0,), mse_sequences=8),
    basin=BasinSettings(n_directions=4, profile_fractions=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
                        threshold=0.1, tolerance=0.05, initial_fraction=0.02, segments=4),
    slices=SliceSettings(points_1d=9, points_2d=7, segments=4),
    curvature=CurvatureSettings(segments=1, seq_len=128, k_top=5, k_bottom=1, lanczos_steps=10, trace_matvecs=6,
                                density_runs=1, density_steps=8, path_t=(0.0, 0.5, 1.0)),
    size_models=("ref-tiny", "ref-small"),
)

FULL = Profile(
    name="full", model="smollm2-135m",
    calib_sequences=128, calib_seq_len=512, eval_segments=24, eval_seq_len=512, eval_corpora=("wiki", "sotu"),
    tables=(TableSpec(("int3",), ("rtn", "gptq", "gptq-noact", "gptq+lorc", "qaft", "fp-finetune")),
            TableSpec(("int4",), ("rtn", "gptq", "gptq-noact", "gptq+lorc", "qaft")),
            TableSpec(("int4-g64", "int3-g64", "int2-g64", "int8", "int2"), ("rtn", "gptq"))),
    headline_format="int3", qaft_lr=3e-4, qaft_epochs=1.0, qaft_batch_size=4, lorc_rank=8,
    misalignment=MisalignmentSettings(formats=("int4", "int3", "int4-g64", "int3-g64"),
                                      strengths=(0.25, 0.5, 0.75, 1.0), seeds=(0, 1), mse_sequences=32),
    basin=BasinSettings(n_directions=16,
                        profile_fractions=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
                        threshold=0.1, tolerance=0.01, initial_fraction=0.02, segments=24),
    slices=SliceSettings(points_1d=17, points_2d=15, segments=8),
    curvature=CurvatureSettings(segments=2, seq_len=512, k_top=10, k_bottom=3, lanczos_steps=50, trace_matvecs=30,
                                density_runs=3, density_steps=30, path_t=(0.0, 0.25, 0.5, 0.75, 1.0), level=0.95),
    size_models=("ref-tiny", "ref-small"),
)

TINY = Profile(
    name="tiny", model="ref-tiny",
    calib_sequences=16, calib_seq_len=32, eval_segments=4, eval_seq_len=32, eval_corpora=("wiki", "sotu"),
    tables=(TableSpec(("int3",), ("rtn", "gptq", "gptq+lorc", "qaft", "fp-finetune")),
            TableSpec(("int4",), ("rtn", "gptq", "qaft")),
            TableSpec(("int4-g32", "int2"), ("rtn", "gptq"))),
    headline_format="int3", qaft_lr=1e-3, qaft_epochs=1.0, qaft_batch_size=4, lorc_rank=2,
    misalignment=MisalignmentSettings(formats=("int4", "int3"), strengths=(0.5, 1.0), seeds=(0,), mse_sequences=4),
    basin=BasinSettings(n_directions=2, profile_fractions=(0.05, 0.2, 0.5), threshold=0.1, tolerance=0.2,
                        initial_fraction=0.05, segments=2),
    slices=SliceSettings(points_1d=5, points_2d=3, segments=2),
    curvature=CurvatureSettings(segments=2, seq_len=32, k_top=3, k_bottom=1, lanczos_steps=8, trace_matvecs=6,
                                density_runs=1, density_steps=6, path_t=(0.0, 1.0), level=0.95),
    size_models=(),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (QUICK, FULL, TINY)}


def context_limit(model: str) -> int | None:
    """The context length of a reference model from its config (no loading); None for other models."""
    from landscape.refmodel import REF_CONFIGS

    return REF_CONFIGS[model].n_ctx if model in REF_CONFIGS else None


def approximate_parameters(model: str) -> int | None:
    """Parameter count known without loading: SmolLM2-135M, or a reference model from its config."""
    from landscape.refmodel import REF_CONFIGS

    if model == "smollm2-135m":
        return SMOLLM2_PARAMETERS
    if model in REF_CONFIGS:
        c = REF_CONFIGS[model]
        return 12 * c.n_layer * c.n_embd**2 + (c.vocab_size + c.n_ctx) * c.n_embd
    return None


def reference_model_built(model: str) -> bool:
    """Whether a reference model is already in the cache (figure 7 never trains ``ref-small`` itself)."""
    from landscape.refmodel import reference_model_dir

    return (reference_model_dir(model) / "landscape_build.json").exists()


# ---------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class Costs:
    """Seconds of work on 2 CPU cores for SmolLM2-135M (FIELD_NOTES.md; the layer-MSE slowdown is an
    estimate). Other models: scaled by parameter count, which underestimates overhead-bound tiny models."""

    model_load: float = 15.0             # cached fp32 safetensors (the one-time GGUF conversion: about 35 s)
    forward_tokens_per_s: float = 480.0  # one NLL evaluation over 16 x 256 tokens in 8.5 s (measured)
    layer_mse_slowdown: float = 1.6      # a forward with an error hook on every linear, vs a plain forward
    gptq_per_format: float = 220.0       # all 210 linears, true-sequential, act-order, 128 x 256 tokens (measured)
    train_tokens_per_s: float = 165.0    # QAFT: 6-7 s per step of 4 x 256 tokens (measured, all 210 linears)
    hvp_tokens_per_s: float = 17.0       # one Hessian-vector product over 2 x 256 tokens in about 30 s
    lorc_svds: float = 15.0              # rank-r SVDs of the 210 error matrices

    def scale(self, model: str) -> float:
        """Cost relative to SmolLM2-135M: the parameter ratio, at least 1 % (small models are overhead-bound)."""
        n = approximate_parameters(model)
        return 1.0 if n is None else max(0.01, n / SMOLLM2_PARAMETERS)

    def forward(self, model: str, tokens: int) -> float:
        return self.scale(model) * tokens / self.forward_tokens_per_s

    def layer_mse(self, model: str, tokens: int) -> float:
        return self.layer_mse_slowdown * self.forward(model, tokens)

    def train(self, model: str, tokens: int) -> float:
        return self.scale(model) * tokens / self.train_tokens_per_s

    def hvp(self, model: str, tokens: int) -> float:
        return self.scale(model) * tokens / self.hvp_tokens_per_s

    def quant_table(self, protocol: Protocol) -> float:
        """One :func:`~landscape.studies.quant_table.run_quant_table` store: every variant quantized and evaluated."""
        m = protocol.model
        calib = protocol.calib_sequences * protocol.calib_seq_len
        mse = self.layer_mse(m, (protocol.layer_mse_sequences or protocol.calib_sequences) * protocol.calib_seq_len)
        evaluation = self.forward(m, len(protocol.eval_corpora) * protocol.eval_segments * protocol.eval_seq_len)
        steps = max(1, round(protocol.qaft_epochs * protocol.calib_sequences / protocol.qaft_batch_size))
        finetune = self.train(m, steps * protocol.qaft_batch_size * protocol.calib_seq_len) + mse
        method_cost = {"rtn": 0.0, "gptq": self.scale(m) * self.gptq_per_format * calib / 32768,
                       "gptq+lorc": self.scale(m) * self.lorc_svds, "qaft": finetune, "fp-finetune": finetune}
        method_cost["gptq-noact"] = method_cost["gptq"]
        total = evaluation  # the fp32 row
        for _ in protocol.formats:  # every row: its method, its layer MSE and its evaluation
            total += sum(method_cost[method] + mse + evaluation for method in protocol.methods)
        return total


COSTS = Costs()


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Step:
    """One measurement: it writes the store at ``store`` and is done once that file exists.

    Attributes:
        title: what it measures, for the plan.
        store: the finished store's path (written atomically by the library: it exists only when complete).
        estimate_s: estimated seconds (:class:`Costs`), for the plan and the progress bar.
        run: does the measurement (resuming a partial store where the library supports it).
        model: the model it needs (loaded once per session, only if some step runs).
    """

    title: str
    store: Path
    estimate_s: float
    run: Callable[[], object] = field(repr=False, compare=False)
    model: str = ""

    @property
    def done(self) -> bool:
        return self.store.exists()


def unique_steps(steps: Sequence[Step]) -> list[Step]:
    """``steps`` without repeats (several figures share a store), in first-seen order."""
    seen: dict[Path, Step] = {}
    for step in steps:
        seen.setdefault(step.store, step)
    return list(seen.values())


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def plan_text(steps: Sequence[Step], session: Session) -> str:
    """The plan with estimated times, marking what the stores already hold."""
    steps = unique_steps(steps)
    todo = [s for s in steps if not s.done]
    models = dict.fromkeys(s.model for s in todo if s.model)
    load = sum(COSTS.model_load * min(1.0, 10 * COSTS.scale(m)) for m in models)
    lines = [f"Plan: {session.profile.name} protocol on {session.profile.model} "
             f"(estimates for 2 CPU cores; stores under {session.data})"]
    for s in steps:
        status = "stored" if s.done else "to do "
        lines.append(f"  [{status}] {s.title:<78} {'' if s.done else '~' + format_seconds(s.estimate_s):>12}")
    lines.append(f"  {len(todo)} of {len(steps)} measurements to do: about "
                 f"{format_seconds(sum(s.estimate_s for s in todo) + load)} "
                 f"(model loading {format_seconds(load)} included)")
    return "\n".join(lines)


def execute(steps: Sequence[Step], progress: bool = True) -> None:
    """Run the steps whose stores do not exist yet, in order, under one progress bar (in estimated seconds)."""
    from tqdm.auto import tqdm

    todo = [s for s in unique_steps(steps) if not s.done]
    if not todo:
        return

    def weight(step: Step) -> int:  # estimated seconds, at least 1 so that every step moves the bar
        return max(1, round(step.estimate_s))

    with tqdm(total=sum(weight(s) for s in todo), desc="measurements", unit="s(est)", disable=not progress,
              dynamic_ncols=True) as bar:
        for step in todo:
            bar.set_postfix_str(step.title[:60])
            started = time.perf_counter()
            step.run()
            if not step.done:
                raise RuntimeError(f"step {step.title!r} finished without writing its store {step.store}")
            took = time.perf_counter() - started
            bar.write(f"  done: {step.title} in {format_seconds(took)} (estimated {format_seconds(step.estimate_s)})")
            bar.update(weight(step))


# ------------------------------------------------------------------------------------------- session
@dataclass
class Session:
    """One run of analysis scripts: the profile, where stores and figures go, and the models it loaded.

    Models are loaded on first use and kept for the session, so a rerun whose stores all exist loads none.
    """

    profile: Profile
    out: Path
    data: Path
    png: bool = True
    progress: bool = True
    _models: dict[str, Any] = field(default_factory=dict, repr=False)

    def model(self, name: str):
        """The :class:`~landscape.models.LoadedModel` ``name`` (loaded once per session)."""
        if name not in self._models:
            from landscape.models import load_model

            started = time.perf_counter()
            self._models[name] = load_model(name)
            if self.progress:
                print(f"  loaded {name} in {format_seconds(time.perf_counter() - started)}", flush=True)
        return self._models[name]

    def profile_for(self, model: str) -> Profile:
        """The session's profile applied to ``model`` (sequence lengths capped at its context)."""
        return self.profile.for_model(model)

    def store_path(self, model: str, kind: str, settings: Mapping[str, Any], suffix: str = ".h5") -> Path:
        """``<data>/<model>/<kind>-<hash of settings><suffix>``: a new path whenever a setting changes."""
        return self.data / model_slug(model) / f"{kind}-{stable_hash(dict(settings), 10)}{suffix}"


def model_slug(model: str) -> str:
    """A file-name-safe form of a model name or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


# -------------------------------------------------------------------------------- quantization tables
def quant_protocols(profile: Profile, main: bool = True) -> list[Protocol]:
    """The quantization tables of ``profile.model``: all of ``profile.tables`` for the main model, or
    (``main=False``, figure 7's other models) only the headline format with RTN, GPTQ and QAFT."""
    specs = profile.tables if main else (TableSpec((profile.headline_format,), ("rtn", "gptq", "qaft")),)
    return [Protocol(model=profile.model, calib_sequences=profile.calib_sequences, calib_seq_len=profile.calib_seq_len,
                     calib_seed=0, eval_corpora=profile.eval_corpora, eval_seq_len=profile.eval_seq_len,
                     eval_segments=profile.eval_segments, formats=spec.formats, methods=spec.methods, seeds=(0,),
                     qaft_lr=profile.qaft_lr, qaft_epochs=profile.qaft_epochs,
                     qaft_batch_size=profile.qaft_batch_size, lorc_rank=profile.lorc_rank,
                     layer_mse_sequences=profile.misalignment.mse_sequences)  # figure 3's convention
            for spec in specs]


def model_protocols(session: Session, model: str) -> list[Protocol]:
    """The quantization tables measured for ``model`` in this session."""
    return quant_protocols(session.profile_for(model), main=model == session.profile.model)


def table_dir(session: Session, protocol: Protocol) -> Path:
    """Directory of one table: ``quant_table.h5`` and the saved quantized models under ``results/``."""
    return session.store_path(protocol.model, "quant", protocol.to_dict(), suffix="")


def table_store(session: Session, protocol: Protocol) -> Path:
    return table_dir(session, protocol) / "quant_table.h5"


def table_stores(session: Session, model: str) -> list[Path]:
    return [table_store(session, p) for p in model_protocols(session, model)]


def quant_table_steps(session: Session, model: str) -> list[Step]:
    """One step per quantization table of ``model`` (:func:`landscape.studies.quant_table.run_quant_table`)."""
    from landscape.studies.quant_table import run_quant_table

    def step(protocol: Protocol) -> Step:
        methods = ", ".join(protocol.methods)
        return Step(f"{model}: quant table {', '.join(protocol.formats)} ({methods})", table_store(session, protocol),
                    COSTS.quant_table(protocol),
                    lambda: run_quant_table(protocol, table_dir(session, protocol), progress=session.progress,
                                            lm=session.model(model)),
                    model)

    return [step(p) for p in model_protocols(session, model)]


def random_direction_of_length(model, seed: int, length: float) -> dict:
    """A random filter-normalised direction rescaled to Euclidean norm ``length`` (``layer -> (out, in)``): the
    baseline of the same length as a displacement (figure 6, ``curvature_study.py``)."""
    from landscape.engine.directions import random_direction

    unit = random_direction(model, seed, "filter").unit()
    return {n: length * t for n, t in unit.tensors.items()}


def quantized_model_path(session: Session, model: str, method: str, fmt: str, seed: int = 0) -> Path:
    """The saved QuantResult (path stem) of ``method`` at ``fmt`` in the quantization tables of ``model``.

    ``fp-finetune`` at a format without its own control gives the one control the tables hold (the
    control is the QAFT loop with the quantizer off: its weights do not depend on the paired format).
    The file is found under the table's ``results/`` with :mod:`landscape.studies.quant_table`'s own naming.

    Raises:
        ValueError: no table of ``model`` runs ``method`` at ``fmt``; FileNotFoundError: not measured yet.
    """
    from landscape.quant import parse_format
    from landscape.studies.quant_table import Variant, result_key

    if method not in QUANT_TABLE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {QUANT_TABLE_METHODS}")
    name = parse_format(fmt).name
    protocols = model_protocols(session, model)
    for protocol in protocols:
        formats = [parse_format(f).name for f in protocol.formats]
        if method in protocol.methods and (name in formats or method == "fp-finetune"):
            key = result_key(protocol, Variant(method, name if name in formats else formats[0], seed))
            found = sorted((table_dir(session, protocol) / "results").glob(f"calib-*/{key}.json"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected one saved {key} under {table_dir(session, protocol)}/results, "
                                        f"found {len(found)}: run the quantization table first")
            return found[0].with_name(key)
    raise ValueError(f"no quantization table of {model} holds {method} at {name}; tables: "
                     f"{[(p.formats, p.methods) for p in protocols]}")


# --------------------------------------------------------------------------------------- model facts
def facts_store(session: Session, model: str) -> Path:
    return session.store_path(model, "facts", {"model": model})


def facts_step(session: Session, model: str) -> Step:
    """Sizes of ``model`` (parameters, quantized parameters, ``||w0||``): figure 2's bits and figure 7's x-axis."""

    def run() -> None:
        from landscape.store import finish_run, start_run
        from landscape.weights import layer_weights

        lm = session.model(model)
        w0 = layer_weights(lm.model)
        arrays = {"n_params": ((), np.int64), "n_quantized": ((), np.int64), "w0_norm": ((), np.float64)}
        with start_run(facts_store(session, model), {"kind": "model_facts", "model": model,
                                                     "model_info": lm.info.to_dict()}, arrays) as record:
            record.write_point((), {"n_params": lm.info.n_params, "n_quantized": sum(w.numel() for w in w0.values()),
                                    "w0_norm": math.sqrt(sum(float(w.double().pow(2).sum()) for w in w0.values()))})
            record.write_table("layers", {"name": list(w0), "out_features": [w.shape[0] for w in w0.values()],
                                          "in_features": [w.shape[1] for w in w0.values()]})
            finish_run(record)

    return Step(f"{model}: model facts (parameter counts, ||w0||)", facts_store(session, model), 1.0, run, model)


# -------------------------------------------------------------------------------------------- data
def eval_set(session: Session, model: str, segments: int | None = None, corpus: str = "wiki",
             seq_len: int | None = None):
    """The first ``segments`` held-out windows of the quantization tables' evaluation set of ``corpus``
    (the same windows, so a subset's NLL can be read from the tables' per-segment sums)."""
    from landscape.data import heldout_set

    profile, lm = session.profile_for(model), session.model(model)
    return heldout_set(lm.tokenizer, seq_len or profile.eval_seq_len, corpus, segments or profile.eval_segments,
                       context_length=lm.info.context_length)


def calibration(session: Session, model: str):
    """The calibration set every method of the quantization tables shares."""
    from landscape.data import calibration_set

    profile, lm = session.profile_for(model), session.model(model)
    return calibration_set(lm.tokenizer, profile.calib_sequences, profile.calib_seq_len, 0,
                           context_length=lm.info.context_length)


# ----------------------------------------------------------------------------------------- publishing
def publish(fig: go.Figure, session: Session, stem: str) -> str:
    """Write ``<out>/<stem>.html`` (and ``.png``) unless the same page is already there; returns what happened.

    The page is compared with what :func:`landscape.figio.write_figure` would write (same plotly.js
    mode, div id and config), so an unchanged figure costs no browser start for its PNG. A page rewritten
    without its PNG (``--no-png``, or no exporter) removes the PNG of the older version.
    """
    import plotly.io as pio

    from landscape.figio import png_export_available, write_figure

    html = session.out / f"{stem}.html"
    page = pio.to_html(fig, include_plotlyjs="directory", full_html=True, div_id=f"fig-{stem}",
                       config={"displaylogo": False})
    png_possible, why_not = png_export_available()
    png_wanted = session.png and png_possible
    unchanged = (html.exists() and html.read_text(encoding="utf-8") == page
                 and (session.out / "plotly.min.js").exists()
                 and (not png_wanted or (session.out / f"{stem}.png").exists()))
    if unchanged:
        return f"{html} unchanged"
    written = write_figure(fig, session.out, stem, png=png_wanted)
    if "png" in written:
        return f"wrote {html} and its PNG"
    (session.out / f"{stem}.png").unlink(missing_ok=True)  # a PNG of an earlier version would be stale
    return f"wrote {html} (PNG skipped: {why_not if session.png else 'disabled by --no-png'})"


# ------------------------------------------------------------------------------------------ arguments
def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments shared by every analysis script (``--quick`` is the default profile)."""
    summary = " ".join(description.strip().split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(description=summary or None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="profile", action="store_const", const="quick",
                       help="quick protocol on smollm2-135m (make figures; the default)")
    which.add_argument("--full", dest="profile", action="store_const", const="full",
                       help="the full protocol (make figures-full; hours on CPU)")
    which.add_argument("--tiny", dest="profile", action="store_const", const="tiny",
                       help="tiny sizes on ref-tiny, for tests and smoke runs (seconds)")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="figure folder (default: figures)")
    parser.add_argument("--data", type=Path, default=None, help="store folder (default: <out>/data)")
    parser.add_argument("--plan", action="store_true", help="print the plan with estimated times and stop")
    parser.add_argument("--no-png", dest="png", action="store_false", help="skip the static PNGs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)  # tests: another model (e.g. ref-tiny)
    parser.set_defaults(profile="quick")
    return parser.parse_args(argv)


def session_from_args(args: argparse.Namespace) -> Session:
    """The session the arguments ask for. An empty ``--model`` or an ``--out`` that is a file fails here; an
    unknown model name fails when the first step loads it, before anything is measured."""
    profile = PROFILES[args.profile]
    if args.model is not None:
        if not isinstance(args.model, str) or not args.model.strip():
            raise ValueError(f"--model must be a model name or path, got {args.model!r}")
        profile = replace(profile, model=args.model)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    return Session(profile, args.out, args.data or args.out / "data", png=args.png, progress=args.progress)


def run_figure_script(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """``main`` of a figure script: plan, measure what the stores lack, build and publish its figure.

    ``module`` provides ``FIGURE`` (the file stem), ``steps(session) -> list[Step]`` and
    ``figure(session) -> go.Figure`` (from stores only).
    """
    args = parse_args(module.__doc__ or module.FIGURE, argv)
    session = session_from_args(args)
    steps = module.steps(session)
    print(plan_text(steps, session), flush=True)
    if args.plan:
        return 0
    execute(steps, session.progress)
    print(publish(module.figure(session), session, module.FIGURE), flush=True)
    return 0
