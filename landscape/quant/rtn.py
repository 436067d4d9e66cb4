"""Round-to-nearest (RTN): every weight goes to the nearest point of its format's grid on w0.

The baseline of every comparison: no data, no error feedback. ``w_q = make_grid(w0, fmt).round(w0)``,
the same lattice GPTQ and QAFT land on.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from landscape.data import TokenSet
from landscape.objectives import layer_mse
from landscape.quant.capture import check_batch_size, check_calibration, resolve_layers
from landscape.quant.formats import QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult
from landscape.weights import Base, LayerSelection, as_base, quantizable_layers, weight_matrix


@torch.no_grad()
def rtn(
    model: nn.Module | Base,
    fmt: QuantFormat | str,
    layers: LayerSelection = None,
    calib: TokenSet | None = None,
    *,
    batch_size: int = 8,
) -> QuantResult:
    """Round each selected layer's weight to the nearest point of ``fmt``'s min-max grid on w0.

    Args:
        model: the model whose weights are w0 (left unchanged), or its :class:`~landscape.weights.Base`
            (whose label is recorded as ``base_model``; default label: the config's ``name_or_path``).
        fmt: a :class:`QuantFormat` or a name such as ``"int4"``, ``"int3-g64"``.
        layers: layer names or glob patterns (default: every quantizable decoder-block linear).
        calib: when given, ``layer_mse`` is filled with each layer's output MSE on the inputs of the
            unmodified model (:func:`landscape.objectives.layer_mse`, ``inputs="reference"``) and the
            data's provenance is recorded; RTN itself never looks at data.
        batch_size: segments per forward pass for the layer MSE (memory only).

    Returns:
        A :class:`QuantResult` with method ``"rtn"``; weights in the model's dtype and device.
    """
    base = as_base(model)
    model = base.model
    fmt = parse_format(fmt)
    names = resolve_layers(model, layers, fmt)
    if calib is not None:
        check_calibration(model, calib)
        check_batch_size(batch_size)
    start = time.perf_counter()
    modules = quantizable_layers(model)
    weights = {}
    for name in names:
        w0 = weight_matrix(modules[name]).detach()
        weights[name] = make_grid(w0, fmt, name).round(w0).contiguous()
    seconds = time.perf_counter() - start
    mse = {} if calib is None else layer_mse(model, calib, weights, inputs="reference", batch_size=batch_size)
    return QuantResult(
        weights=weights,
        format=fmt,
        method="rtn",
        settings={"grid": "min-max of w0, static groups",
                  "layers": layers if layers is None or isinstance(layers, str) else list(layers)},
        base_model=base.label,
        base_fingerprint=base.fingerprint(names),
        calibration=calib.provenance() if calib is not None else {},
        seconds=seconds,
        layer_mse=mse,
        extra={"layer_mse_inputs": "full-precision model"} if calib is not None else {},
    )
