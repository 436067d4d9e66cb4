"""Our results as checkpoints other tools load: ``landscape export R --format compressed-tensors --out DIR``.

A result on one of our integer grids (RTN, GPTQ, QAFT at ``int<b>``, ``int<b>-g<G>``, ``-sym``; 2 to 8 bits)
is written with the ``compressed-tensors`` library (the format of llm-compressor and vLLM, which transformers
loads): each quantized linear gets the scale and zero point of its grid (ours: ``scale * (q - zero)`` with
codes ``0 .. 2**b - 1``; theirs: signed codes, so their zero point is ours minus ``2**(b - 1)``), the library
rounds the weights onto them (exactly: they are lattice points) and stores the codes. The ``int-quantized``
layout is used (one code per int8): with compressed-tensors 0.20 and transformers 5.23 an asymmetric
``pack-quantized`` checkpoint does not reload (its packed zero points are refused as a size mismatch).
``AutoModelForCausalLM.from_pretrained(DIR)`` then gives our quantized model, the NLL equal to ours.

Formats that compressed-tensors cannot hold are refused before anything is written: a real-valued zero point
(``-fz``), MX block formats (a shared power-of-two exponent per block), one scale per tensor for an
asymmetric format, and results on no grid of ours (LoRC corrections, full-precision controls, imported
checkpoints off our grid).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from loguru import logger

from landscape.interop.gptq_packed import CheckpointError
from landscape.quant.formats import QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult, on_a_grid
from landscape.weights import get_layer, weight_matrix

EXPORT_FORMATS = ("compressed-tensors",)
LAYOUT = "int-quantized"


def check_exportable(meta: Mapping[str, Any], target: str = "compressed-tensors") -> QuantFormat:
    """The format of a saved result (its metadata: :func:`landscape.quant.result.read_result_metadata`), or a
    :class:`CheckpointError` saying why ``target`` cannot hold it: checked before any model is loaded."""
    if target not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {target!r}; accepted: {EXPORT_FORMATS}")
    fmt = parse_format(meta["format"]) if meta.get("format") else None
    label = f"{meta['method']} {fmt.name if fmt else (meta.get('extra') or {}).get('off_grid_label', 'fp32')}"
    if not on_a_grid(fmt, meta["method"]):
        raise CheckpointError(f"{label} lies on no grid of ours (a LoRC correction, a full-precision "
                              f"control or a checkpoint imported off our grid): {target} stores codes, "
                              f"scales and zero points, which it does not have")
    if fmt.float_zero:
        raise CheckpointError(f"{fmt.name} has a real-valued zero point; {target} stores integer zero "
                              f"points: export an integer-zero format ({fmt.name.replace('-fz', '')})")
    if fmt.granularity == "mx":
        raise CheckpointError(f"{fmt.name} is an MX block format (a shared power-of-two exponent per block "
                              f"of {fmt.group_size}); {target} holds integer formats with float scales only")
    if fmt.granularity == "tensor" and not fmt.symmetric:
        raise CheckpointError(f"{fmt.name}: {target} holds one scale per tensor only symmetric; export a "
                              f"per-channel or group format")
    if (meta.get("extra") or {}).get("learned_scales"):
        raise CheckpointError(f"{label} learned its scales (LSQ); exporting learned scales is not "
                              f"supported yet")
    return fmt


def scheme_of(fmt: QuantFormat) -> QuantizationScheme:
    """compressed-tensors' scheme for our format (static min-max scales, integer codes)."""
    strategy = {"channel": "channel", "group": "group", "tensor": "tensor"}[fmt.granularity]
    args = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy=strategy,
                            group_size=fmt.group_size if strategy == "group" else None)
    return QuantizationScheme(targets=["Linear"], weights=args)


@torch.no_grad()
def export_compressed_tensors(model: torch.nn.Module, tokenizer, result: QuantResult,
                              out: str | os.PathLike) -> Path:
    """Write ``result`` on ``model`` (its base, at w0; changed in place: pass a model you will not use again)
    as a compressed-tensors checkpoint in ``out`` (with ``tokenizer``); returns ``out``."""
    fmt = check_exportable(result.metadata())
    for name in result.weights:
        layer = get_layer(model, name)
        if not isinstance(layer, torch.nn.Linear):
            raise CheckpointError(f"compressed-tensors quantizes torch.nn.Linear layers; {name!r} is a "
                                  f"{type(layer).__name__} (GPT-2's Conv1D, say): this model cannot be "
                                  f"exported")
    out = Path(out)
    grids = {name: make_grid(weight_matrix(get_layer(model, name)).detach(), fmt, name)
             for name in result.weights}
    config = QuantizationConfig(config_groups={"group_0": scheme_of(fmt)},
                                ignore=sorted(n for n, m in model.named_modules()
                                              if isinstance(m, torch.nn.Linear) and n not in result.weights))
    apply_quantization_config(model, config)
    offset = 0 if fmt.symmetric else 2 ** (fmt.bits - 1)  # our codes 0..2^b-1 -> theirs, signed
    for name, w in result.weights.items():
        module, grid = get_layer(model, name), grids[name]
        module.weight.copy_(w.to(module.weight.dtype))
        module.weight_scale.copy_(grid.scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            zero = (grid.zero - offset).reshape(module.weight_zero_point.shape)
            module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
    logger.disable("compressed_tensors")  # its note that int-quantized is not the layout it would infer
    compressor = ModelCompressor.from_pretrained_model(model, LAYOUT)
    compressor.compress_model(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    compressor.update_config(str(out))
    return out
