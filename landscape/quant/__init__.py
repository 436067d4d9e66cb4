"""The quantization core: formats and their grids, the solvers that land on them, and the registry of methods.

Every method returns a :class:`QuantResult` on the lattice of :func:`make_grid` (computed once from w0),
so RTN, GPTQ and QAFT endpoints are directly comparable. Each solver takes its settings as one object
(:class:`GPTQSettings`, :class:`FinetuneSettings`, :class:`GenerationSettings`) and the model as an
``nn.Module`` or a :class:`landscape.weights.Base`; :data:`METHODS` names them all
(:mod:`landscape.quant.methods`).
"""

from landscape.quant.activations import (
    ActivationQuant,
    ActivationQuantError,
    BitSetting,
    fake_quant_activations,
    kv_projections,
    parse_bit_setting,
    quantized_activations,
)
from landscape.quant.formats import FormatError, Grid, QuantFormat, make_grid, parse_format, sqnr_db
from landscape.quant.gptq import CholeskyError, GPTQLayerInfo, GPTQSettings, gptq, gptq_group, gptq_layer
from landscape.quant.llm_qat import LLM_QAT_SETTINGS, GenerationSettings, generate_training_text, llm_qat
from landscape.quant.lorc import lorc
from landscape.quant.lr_selection import LearningRateSweepSettings, select_learning_rate
from landscape.quant.methods import (
    METHODS,
    QUANT_TABLE_METHODS,
    Method,
    QuantJob,
    UnknownMethodError,
    run_method,
)
from landscape.quant.qaft import (
    FinetuneSettings,
    LearningRateSweep,
    QAFTError,
    fp_finetune,
    paired_control,
    qaft,
)
from landscape.quant.result import (
    QuantResult,
    ResultExistsError,
    ResultFileError,
    ResultIntegrityError,
    ResultMismatchError,
    ResultOffGridError,
)
from landscape.quant.rtn import rtn

__all__ = ["LLM_QAT_SETTINGS", "METHODS", "QUANT_TABLE_METHODS", "ActivationQuant", "ActivationQuantError",
           "BitSetting", "CholeskyError", "FinetuneSettings", "FormatError", "GPTQLayerInfo",
           "GPTQSettings", "GenerationSettings", "Grid", "LearningRateSweep", "LearningRateSweepSettings",
           "Method", "QAFTError", "QuantFormat", "QuantJob", "QuantResult", "ResultExistsError",
           "ResultFileError", "ResultIntegrityError", "ResultMismatchError", "ResultOffGridError",
           "UnknownMethodError", "fake_quant_activations", "fp_finetune", "generate_training_text", "gptq",
           "gptq_group", "gptq_layer", "kv_projections", "llm_qat", "lorc", "make_grid",
           "paired_control", "parse_bit_setting", "parse_format", "qaft", "quantized_activations", "rtn",
           "run_method", "select_learning_rate", "sqnr_db"]
