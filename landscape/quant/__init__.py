"""The quantization core: formats and their grids, and the solvers that land on them."""

from .formats import FormatError, Grid, QuantFormat, make_grid, parse_format, sqnr_db
from .gptq import CholeskyError, GPTQLayerInfo, gptq, gptq_layer
from .lorc import lorc
from .result import QuantResult, ResultMismatchError
from .rtn import rtn

__all__ = ["CholeskyError", "FormatError", "GPTQLayerInfo", "Grid", "QuantFormat", "QuantResult",
           "ResultMismatchError", "gptq", "gptq_layer", "lorc", "make_grid", "parse_format", "rtn", "sqnr_db"]
