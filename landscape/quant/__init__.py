"""The quantization core: formats and their grids, and the solvers that land on them."""

from .formats import FormatError, Grid, QuantFormat, make_grid, parse_format, sqnr_db

__all__ = ["FormatError", "Grid", "QuantFormat", "make_grid", "parse_format", "sqnr_db"]
