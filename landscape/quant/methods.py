"""The one table of quantization methods: name -> :class:`Method` (a description and a runner).

Every caller that quantizes by name goes through :data:`METHODS`: ``landscape quantize --method NAME`` and
the quantization table (:mod:`landscape.studies.quant_table`); figures can name methods by
:attr:`Method.label`. A runner takes one
:class:`QuantJob`, everything a method may need at one format (the base, the calibration set, the settings
objects of every solver, LoRC's rank, the layers...), and returns a
:class:`~landscape.quant.result.QuantResult`; each method reads the fields it uses.

Methods built on another method's result (``<base>+lorc``) ask the job for it with
:meth:`QuantJob.result_of`: a caller that keeps results (the quantization table caches and saves them) hands
the job a ``results`` function, so ``gptq+lorc`` reuses the saved ``gptq``; without one it is computed.

Registering a method is one :class:`Method` in :data:`METHODS`; :data:`QUANT_TABLE_METHODS` are those the
quantization table runs, in its row order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from landscape.data import TokenSet
from landscape.quant.formats import QuantFormat, parse_format
from landscape.quant.gptq import GPTQSettings, gptq
from landscape.quant.llm_qat import LLM_QAT_SETTINGS, GenerationSettings, llm_qat
from landscape.quant.lorc import DEFAULT_RANK, lorc
from landscape.quant.lr_selection import LearningRateSweepSettings, select_learning_rate
from landscape.quant.qaft import FinetuneSettings, QAFTError, fp_finetune, qaft
from landscape.quant.result import QuantResult
from landscape.quant.rtn import rtn
from landscape.weights import Base, LayerSelection


class UnknownMethodError(ValueError):
    """A method name that is not in :data:`METHODS`."""


@dataclass(frozen=True)
class QuantJob:
    """Everything a method may need to quantize one model at one format; each runner reads what it uses.

    Attributes:
        base: the model at w0 and its label (:class:`~landscape.weights.Base`; ``LoadedModel.base``).
        calib: the calibration set (GPTQ's Hessians, QAFT's training text, layer MSE inputs).
        fmt: the weight format (a name is parsed).
        layers: layer names or globs to quantize (None: every quantizable layer).
        gptq: GPTQ's settings (``gptq-noact`` switches act-order off).
        finetune: QAFT's settings; the control (``fp-finetune``) trains with the same ones, quantizer off.
            None: each fine-tuning method's own default (:attr:`Method.finetune_defaults`).
        generation: LLM-QAT's text generation (None: the calibration budget, ``calib.n_segments`` sequences
            of ``calib.seq_len`` tokens, default sampling).
        lorc_rank: rank of LoRC's correction (``<base>+lorc``).
        lr_sweep: when given, ``qaft`` and ``fp-finetune`` choose their learning rate on a split of ``calib``
            (:func:`~landscape.quant.lr_selection.select_learning_rate`; ``finetune.lr`` left at its default),
            and store the sweep in ``extra["lr_selection"]``.
        batch_size: calibration segments per forward pass (GPTQ's inputs, layer MSE; memory only).
        mse_data: inputs of the fine-tuning methods' layer MSE (None: ``calib``).
        measure_layer_mse: False leaves ``layer_mse`` empty where it would cost extra forward passes (RTN,
            LoRC), for callers that measure every result themselves (the quantization table).
        progress: show progress bars.
        results: ``results(method)``: another method's result at this format (and seed), e.g. from a cache
            of saved results; None: :meth:`result_of` computes it with this job.
    """

    base: Base
    calib: TokenSet
    fmt: QuantFormat
    layers: LayerSelection = None
    gptq: GPTQSettings = GPTQSettings()
    finetune: FinetuneSettings | None = None
    generation: GenerationSettings | None = None
    lorc_rank: int = DEFAULT_RANK
    lr_sweep: LearningRateSweepSettings | None = None
    batch_size: int = 8
    mse_data: TokenSet | None = None
    measure_layer_mse: bool = True
    progress: bool = True
    results: Callable[[str], QuantResult] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base, Base):
            raise TypeError(f"base must be a landscape.weights.Base (e.g. LoadedModel.base), "
                            f"got {type(self.base).__name__}")
        object.__setattr__(self, "fmt", parse_format(self.fmt))

    def result_of(self, method: str) -> QuantResult:
        """``method``'s result at this job's format: from ``results`` when given, else computed now."""
        if self.results is not None:
            return self.results(method)
        return run_method(method, self)

    def finetune_settings(self, method: str) -> FinetuneSettings:
        """The fine-tuning settings ``method`` trains with: ``finetune``, or the method's own default."""
        if self.finetune is not None:
            return self.finetune
        return METHODS[method].finetune_defaults or FinetuneSettings()

    @property
    def layer_mse_data(self) -> TokenSet | None:
        """Inputs of the layer MSE of RTN and LoRC: ``mse_data`` or ``calib``; None when not measured."""
        if not self.measure_layer_mse:
            return None
        return self.calib if self.mse_data is None else self.mse_data


Runner = Callable[[QuantJob], QuantResult]


@dataclass(frozen=True)
class Method:
    """A quantization method of the registry.

    Attributes:
        name: the method's name (``--method``, the table's ``method`` column, result keys).
        label: its name in figures and tables.
        description: one line: what it does.
        run: the runner, ``run(job) -> QuantResult``.
        seeded: trained from a seeded data order (``finetune.seed``): the table runs it once per seed.
        finetune_defaults: the :class:`FinetuneSettings` it trains with when the job gives none (None: it
            does not fine-tune).
        in_quant_table: one of the quantization table's methods (its result keys name their settings).
    """

    name: str
    label: str
    description: str
    run: Runner
    seeded: bool = False
    finetune_defaults: FinetuneSettings | None = None
    in_quant_table: bool = False


def run_method(name: str, job: QuantJob) -> QuantResult:
    """Run the method called ``name`` on ``job``; :class:`UnknownMethodError` names the valid ones."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name].run(job)


# ------------------------------------------------------------------------------------------- runners
def _rtn(job: QuantJob) -> QuantResult:
    return rtn(job.base, job.fmt, job.layers, job.layer_mse_data, batch_size=job.batch_size)


def _gptq(job: QuantJob) -> QuantResult:
    return gptq(job.base, job.calib, job.fmt, job.gptq, layers=job.layers, batch_size=job.batch_size,
                progress=job.progress)


def _gptq_noact(job: QuantJob) -> QuantResult:
    return gptq(job.base, job.calib, job.fmt, replace(job.gptq, act_order=False), layers=job.layers,
                batch_size=job.batch_size, progress=job.progress)


def _with_chosen_lr(job: QuantJob, settings: FinetuneSettings) -> FinetuneSettings:
    """``settings``, at the learning rate a sweep on the calibration split chooses when the job asks for
    one."""
    if job.lr_sweep is None:
        return settings
    sweep = select_learning_rate(job.base, job.calib, job.fmt, settings, job.lr_sweep, layers=job.layers,
                                 progress=job.progress)
    return replace(settings, lr=sweep)


def _qaft(job: QuantJob) -> QuantResult:
    settings = _with_chosen_lr(job, job.finetune_settings("qaft"))
    return qaft(job.base, job.calib, job.fmt, settings, layers=job.layers, progress=job.progress,
                mse_data=job.mse_data)


def _fp_finetune(job: QuantJob) -> QuantResult:
    settings = _with_chosen_lr(job, replace(job.finetune_settings("fp-finetune"), quantize=False))
    return fp_finetune(job.base, job.calib, job.fmt, settings, layers=job.layers, progress=job.progress,
                       mse_data=job.mse_data)


def _llm_qat(job: QuantJob) -> QuantResult:
    if job.lr_sweep is not None:
        raise QAFTError("a learning-rate sweep is not available for llm-qat (its text is generated, there is "
                        "no calibration split to select on); give a number")
    generation = job.generation or GenerationSettings(job.calib.seq_len, n_sequences=job.calib.n_segments)
    return llm_qat(job.base, job.fmt, job.finetune_settings("llm-qat"), generation, layers=job.layers,
                   progress=job.progress)


def with_lorc(base_method: str) -> Runner:
    """The runner of ``f"{base_method}+lorc"``: ``base_method``'s result (:meth:`QuantJob.result_of`), then a
    rank ``job.lorc_rank`` LoRC correction."""

    def run(job: QuantJob) -> QuantResult:
        return lorc(job.base, job.result_of(base_method), rank=job.lorc_rank, calib=job.layer_mse_data,
                    batch_size=job.batch_size, progress=job.progress)

    return run


_QAFT_DEFAULTS = FinetuneSettings()

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "RTN", "round to nearest: every weight to the nearest point of the grid of w0", _rtn,
           in_quant_table=True),
    Method("gptq", "GPTQ", "GPTQ: layer-wise second-order error feedback on the calibration inputs, "
           "act-order", _gptq, in_quant_table=True),
    Method("gptq-noact", "GPTQ (no act-order)", "GPTQ with the columns in natural order (act-order off)",
           _gptq_noact, in_quant_table=True),
    Method("gptq+lorc", "GPTQ + LoRC", "GPTQ, then LoRC's rank-r correction of each layer's error",
           with_lorc("gptq"), in_quant_table=True),
    Method("qaft", "QAFT", "quantization-aware fine-tuning of the global NLL through the grid of w0 (STE)",
           _qaft, seeded=True, finetune_defaults=_QAFT_DEFAULTS, in_quant_table=True),
    Method("fp-finetune", "fp32 fine-tuned (QAFT's control)",
           "QAFT's full-precision control: the same loop and settings with the quantizer off", _fp_finetune,
           seeded=True, finetune_defaults=_QAFT_DEFAULTS, in_quant_table=True),
    Method("llm-qat", "LLM-QAT", "data-free QAT: distillation into the grid on text the model generates",
           _llm_qat, seeded=True, finetune_defaults=LLM_QAT_SETTINGS),
    Method("rtn+lorc", "RTN + LoRC", "RTN, then LoRC's rank-r correction of each layer's error",
           with_lorc("rtn")),
    Method("qaft+lorc", "QAFT + LoRC", "QAFT, then LoRC's rank-r correction of each layer's error",
           with_lorc("qaft"), seeded=True, finetune_defaults=_QAFT_DEFAULTS),
)}

QUANT_TABLE_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.in_quant_table)
