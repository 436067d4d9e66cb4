"""The protocols of the analyses, like a configs folder: every size of the study in one frozen object.

A :class:`Profile` fixes every size of the study (calibration budget, evaluation tokens, formats, directions,
grids, Lanczos steps...). Three exist: ``quick`` (``make figures``: SmolLM2-135M in well under an hour on 2
CPU cores), ``full`` (``make figures-full``: the full protocol, hours on CPU) and ``tiny`` (tests and smoke
runs on ``ref-tiny``: seconds). Everything that defines a store's numbers is hashed into its path
(:meth:`analyses.session.Session.store_path`), so a changed setting writes a new store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from landscape.refmodel import REF_CONFIGS, REF_FAMILY, reference_model_dir
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
        corpus: the in-domain text: the calibration set is drawn from its training split, and figures 3-7
            measure on its held-out split (``wiki``, or a user's ``text:PATH``: :meth:`with_text`).
        tables: the quantization tables; ``tables[0]`` holds the headline format with QAFT, LoRC and the
            full-precision fine-tuning control.
        headline_format: the format of figures 3 (with the others), 4, 5, 6 and 7.
        qaft_lr, qaft_epochs, qaft_batch_size: QAFT and its control; lorc_rank: LoRC's rank.
        qaft_micro_batch_size: sequences per QAFT forward/backward pass (memory only; ``None``: the batch).
        qaft_recompute_blocks: recompute each decoder block in QAFT's backward passes (memory only, the same
            bits, one more forward pass per backward pass).
        size_models: further models of figure 7, smallest first.
        train_size_models: train the reference models among ``size_models`` that are not built yet (set by
            ``--size-models``); otherwise figure 7 uses those already built and never trains one (they take
            minutes each: ``make size-family``).
        predictor_formats: the formats, besides the headline one, at which the predictor study
            (``analyses.predictor_study``) measures RTN, GPTQ, QAFT and the control on every figure-7 model:
            each is one case of ``||d_RTN|| / R(w0)`` against its baselines.
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
    qaft_micro_batch_size: int | None = None
    qaft_recompute_blocks: bool = False
    corpus: str = "wiki"
    train_size_models: bool = False
    predictor_formats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        headline = self.tables[0] if self.tables else None
        if headline is None or self.headline_format not in headline.formats or \
                not {"rtn", "gptq", "qaft"} <= set(headline.methods):
            raise ValueError(f"profile {self.name!r}: tables[0] must hold the headline format "
                             f"{self.headline_format!r} with rtn, gptq and qaft; got {headline}")
        if self.corpus not in self.eval_corpora:
            raise ValueError(f"profile {self.name!r}: eval_corpora must include the in-domain corpus "
                             f"{self.corpus!r} (figures 3-7 use it), got {self.eval_corpora}")
        for what, n in (("basin", self.basin.segments), ("slices", self.slices.segments)):
            if not 1 <= n <= self.eval_segments:
                raise ValueError(f"profile {self.name!r}: {what}.segments={n} must be in 1..eval_segments="
                                 f"{self.eval_segments} (they are the first evaluation segments)")
        if (self.slices.points_1d - 1) % 4:
            raise ValueError(f"profile {self.name!r}: slices.points_1d={self.slices.points_1d} must be 1 + a "
                             f"multiple of 4, so that t = 0 and t = 1 lie on the grid -0.5 .. 1.5")
        if not 1 <= self.misalignment.mse_sequences <= self.calib_sequences:
            raise ValueError(f"profile {self.name!r}: "
                             "misalignment.mse_sequences must be in 1..calib_sequences")
        predictor = (TableSpec(self.predictor_formats, ("rtn",)),) if self.predictor_formats else ()
        for spec in (*self.tables, *predictor):
            try:
                Protocol(formats=spec.formats, methods=spec.methods)
            except ValueError as err:
                raise ValueError(f"profile {self.name!r}: table {spec.formats} x {spec.methods}: "
                                 f"{err}") from None

    def for_model(self, model: str) -> Profile:
        """This profile for ``model``, with every sequence length capped at the model's context length."""
        limit = context_limit(model)
        if limit is None:
            return replace(self, model=model)
        return replace(self, model=model, calib_seq_len=min(self.calib_seq_len, limit),
                       eval_seq_len=min(self.eval_seq_len, limit),
                       curvature=replace(self.curvature, seq_len=min(self.curvature.seq_len, limit)))

    def with_text(self, corpus: str) -> Profile:
        """This profile on a user's text (a :func:`landscape.data.text_corpus` name): calibration from its
        training documents, in-domain evaluation on its held-out ones (the out-of-domain sets stay)."""
        others = tuple(c for c in self.eval_corpora if c != self.corpus)
        return replace(self, corpus=corpus, eval_corpora=(corpus, *others))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Issue #22 item 4: 3-6 bits, per-channel, 32-wide groups and MX blocks; with the headline int3, 7 cases a
# model. Each divides the in_features of SmolLM2 (576, 1536) and of the reference models (64-256, 4x that).
# int4-g32 is left out: SmolLM2's weights already lie on a 4-bit group-32 grid, where RTN is lossless (a
# degenerate case), and on SmolLM2 each format costs about 10 min on 2 cores.
PREDICTOR_FORMATS = ("int4", "int5", "int6", "int3-g32", "mxint4-32", "mxint3-32")

QUICK = Profile(
    name="quick", model="smollm2-135m",
    calib_sequences=128, calib_seq_len=256, eval_segments=16, eval_seq_len=256, eval_corpora=("wiki", "sotu"),
    tables=(TableSpec(("int3",), ("rtn", "gptq", "gptq+lorc", "qaft", "fp-finetune")),
            TableSpec(("int4",), ("rtn", "gptq", "qaft")),
            # GPTQ of all 210 linears costs about 4 min per format on 2 cores: the group formats, 8 and 2 bits
            # get RTN only in quick mode (make figures-full runs GPTQ at every format).
            TableSpec(("int4-g64", "int3-g64", "int8", "int2"), ("rtn",))),
    headline_format="int3", qaft_lr=3e-4, qaft_epochs=1.0, qaft_batch_size=4, lorc_rank=8,
    misalignment=MisalignmentSettings(formats=("int4", "int3"), strengths=(0.5, 1.0), seeds=(0,),
                                      mse_sequences=8),
    basin=BasinSettings(n_directions=4, profile_fractions=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
                        threshold=0.1, tolerance=0.05, initial_fraction=0.02, segments=4),
    slices=SliceSettings(points_1d=9, points_2d=7, segments=4),
    curvature=CurvatureSettings(segments=1, seq_len=128, k_top=5, k_bottom=1, lanczos_steps=10,
                                trace_matvecs=6, density_runs=1, density_steps=8, path_t=(0.0, 0.5, 1.0)),
    size_models=("ref-tiny", *REF_FAMILY),
    qaft_micro_batch_size=1,  # a quarter of the activations: SmolLM2 QAFT peaks at 4.2 GB, not 6.0
    qaft_recompute_blocks=True,  # and a block's at a time: 3.34 GB against 3.66 for QAFT alone, +30 % time
    predictor_formats=PREDICTOR_FORMATS,
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
                        profile_fractions=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                                           0.5),
                        threshold=0.1, tolerance=0.01, initial_fraction=0.02, segments=24),
    slices=SliceSettings(points_1d=17, points_2d=15, segments=8),
    curvature=CurvatureSettings(segments=2, seq_len=512, k_top=10, k_bottom=3, lanczos_steps=50,
                                trace_matvecs=30, density_runs=3, density_steps=30,
                                path_t=(0.0, 0.25, 0.5, 0.75, 1.0), level=0.95),
    size_models=("ref-tiny", *REF_FAMILY),
    qaft_micro_batch_size=1,  # a quarter of the activations: SmolLM2 QAFT peaks at 4.2 GB, not 6.0
    predictor_formats=PREDICTOR_FORMATS,
)

TINY = Profile(
    name="tiny", model="ref-tiny",
    calib_sequences=16, calib_seq_len=32, eval_segments=4, eval_seq_len=32, eval_corpora=("wiki", "sotu"),
    tables=(TableSpec(("int3",), ("rtn", "gptq", "gptq+lorc", "qaft", "fp-finetune")),
            TableSpec(("int4",), ("rtn", "gptq", "qaft")),
            TableSpec(("int4-g32", "int2"), ("rtn", "gptq"))),
    headline_format="int3", qaft_lr=1e-3, qaft_epochs=1.0, qaft_batch_size=4, lorc_rank=2,
    misalignment=MisalignmentSettings(formats=("int4", "int3"), strengths=(0.5, 1.0), seeds=(0,),
                                      mse_sequences=4),
    basin=BasinSettings(n_directions=2, profile_fractions=(0.05, 0.2, 0.5), threshold=0.1, tolerance=0.2,
                        initial_fraction=0.05, segments=2),
    slices=SliceSettings(points_1d=5, points_2d=3, segments=2),
    curvature=CurvatureSettings(segments=2, seq_len=32, k_top=3, k_bottom=1, lanczos_steps=8, trace_matvecs=6,
                                density_runs=1, density_steps=6, path_t=(0.0, 1.0), level=0.95),
    size_models=(),
    predictor_formats=("int4", "int4-g32", "mxint4-32"),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (QUICK, FULL, TINY)}


def context_limit(model: str) -> int | None:
    """The context length of a reference model from its config (no loading); None for other models."""
    return REF_CONFIGS[model].n_ctx if model in REF_CONFIGS else None


def approximate_parameters(model: str) -> int | None:
    """Parameter count known without loading: SmolLM2-135M, or a reference model from its config."""
    if model == "smollm2-135m":
        return SMOLLM2_PARAMETERS
    if model in REF_CONFIGS:
        c = REF_CONFIGS[model]
        return 12 * c.n_layer * c.n_embd**2 + (c.vocab_size + c.n_ctx) * c.n_embd
    return None


def reference_model_built(model: str) -> bool:
    """Whether a reference model is already in the cache (figure 7 never trains ``ref-small`` itself)."""
    return (reference_model_dir(model) / "landscape_build.json").exists()

