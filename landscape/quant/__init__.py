"""The quantization core: formats and their grids, and the solvers that land on them.

Every method returns a :class:`QuantResult` on the lattice of :func:`make_grid` (computed once from w0),
so RTN, GPTQ and QAFT endpoints are directly comparable.
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
from landscape.quant.gptq import CholeskyError, GPTQLayerInfo, gptq, gptq_layer
from landscape.quant.llm_qat import generate_training_text, llm_qat
from landscape.quant.lorc import lorc
from landscape.quant.qaft import (
           FinetuneSettings,
           LearningRateSweep,
           QAFTError,
           finetune,
           fp_finetune,
           paired_control,
           qaft,
           select_learning_rate,
)
from landscape.quant.result import QuantResult, ResultFileError, ResultMismatchError
from landscape.quant.rtn import rtn

__all__ = ["ActivationQuant", "ActivationQuantError", "BitSetting", "CholeskyError", "FinetuneSettings", "FormatError",
           "GPTQLayerInfo", "Grid", "LearningRateSweep", "QAFTError", "QuantFormat", "QuantResult", "ResultFileError",
           "ResultMismatchError", "fake_quant_activations", "finetune", "fp_finetune", "generate_training_text", "gptq",
           "gptq_layer", "kv_projections", "llm_qat", "lorc", "make_grid", "paired_control", "parse_bit_setting",
           "parse_format", "qaft", "quantized_activations", "rtn", "select_learning_rate", "sqnr_db"]
