"""LoRC, low-rank compensation (ZeroQuant-V2, Yao et al., 2023): ``W_final = Q(W) + U V``.

``U V`` is the rank-``r`` truncated SVD of the quantization error ``E = W - Q(W)``: with
``E = sum_i s_i u_i v_i^T``, ``U = [u_i sqrt(s_i)]`` (``(out, r)``) and ``V = [sqrt(s_i) v_i^T]``
(``(r, in)``), ``i = 1..r``. By Eckart-Young the remaining error is the smallest possible for rank ``r``:
``||W - W_final||_F = sqrt(sum_{i>r} s_i^2)``. ``U`` and ``V`` are stored in fp16 by default (as in the
paper), so the result uses the fp16-rounded factors and costs ``16 * r * (out + in)`` extra bits per layer.
LoRC works on top of any method's :class:`QuantResult` (RTN, GPTQ, QAFT...).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.objectives import layer_mse
from landscape.quant.capture import check_batch_size, check_calibration
from landscape.quant.result import QuantResult, ResultMismatchError
from landscape.weights import Base, as_base, quantizable_layers, weight_matrix

DEFAULT_RANK = 8


def low_rank_factors(error: torch.Tensor, rank: int, factor_dtype: torch.dtype | None = torch.float16
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V`` the rank-``rank`` truncated SVD of ``error`` (``(out, in)``).

    The SVD is computed in float64; the singular values are split evenly (``sqrt(s)`` into each factor)
    and the factors are cast to ``factor_dtype`` (their storage dtype; ``None`` keeps float64).
    Returns ``U`` ``(out, rank)`` and ``V`` ``(rank, in)``.
    """
    u, s, vh = torch.linalg.svd(error.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    U, V = u[:, :rank] * root, root[:, None] * vh[:rank]
    return (U, V) if factor_dtype is None else (U.to(factor_dtype), V.to(factor_dtype))


@torch.no_grad()
def lorc(
    model: nn.Module | Base,
    quantized: QuantResult,
    rank: int = DEFAULT_RANK,
    *,
    factor_dtype: torch.dtype | None = torch.float16,
    calib: TokenSet | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantResult:
    """Add a rank-``rank`` correction of each layer's quantization error to ``quantized``.

    Args:
        model: the model at w0 ``quantized`` was computed from (checked by fingerprint), or its
            :class:`~landscape.weights.Base`.
        quantized: a quantized result (RTN, GPTQ, ...); its weights are ``Q(W)``.
        rank: rank ``r`` of the correction, ``1 <= r <= min(out, in)`` of every layer.
        factor_dtype: storage dtype of ``U`` and ``V`` (fp16 by default; ``None``: exact float64 factors).
        calib: when given, ``layer_mse`` is recomputed on the full-precision model's inputs for the
            corrected weights (otherwise it is left empty: the base's MSE no longer applies).
        batch_size: segments per forward pass for the layer MSE (memory only).
        progress: show a progress bar over layers (one SVD each).

    Returns:
        A :class:`QuantResult` with method ``f"{quantized.method}+lorc"``, its format, base model and
        settings, the corrected weights ``Q(W) + U V`` (off the grid by design: the grid part is
        ``quantized.weights``), and in
        ``extra``: the rank, extra parameters per layer and in total, their storage bits and the
        relative Frobenius error per layer before and after the correction.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer (e.g. 8), got {rank!r}")
    if factor_dtype is not None and not factor_dtype.is_floating_point:
        raise ValueError(f"factor_dtype must be a floating dtype or None, got {factor_dtype!r}")
    if not quantized.weights:
        raise ValueError(f"base result {quantized.label!r} has no layers")
    base = as_base(model)
    model = base.model
    modules = quantizable_layers(model)
    unknown = [n for n in quantized.weights if n not in modules]
    if unknown:
        raise KeyError(f"base result has layers {unknown[:4]} that are not quantizable layers of this model")
    names = list(quantized.weights)
    fingerprint = base.fingerprint(names)
    if quantized.base_fingerprint and quantized.base_fingerprint != fingerprint:
        raise ResultMismatchError(f"base result {quantized.label!r} was computed on weights with fingerprint "
                                  f"{quantized.base_fingerprint}, this model's are {fingerprint}")
    for name in names:
        shape = tuple(weight_matrix(modules[name]).shape)
        if tuple(quantized.weights[name].shape) != shape:
            raise ValueError(f"{name}: base weight has shape {tuple(quantized.weights[name].shape)}, layer "
                             f"has {shape}")
        if rank > min(shape):
            raise ValueError(f"rank {rank} exceeds min(out, in) = {min(shape)} of layer {name!r} {shape}")
        if not torch.isfinite(quantized.weights[name]).all():
            raise ValueError(f"{name}: base weight contains NaN or Inf")
    if calib is not None:
        check_calibration(model, calib)
        check_batch_size(batch_size)

    start = time.perf_counter()
    weights, extra_params, error_before, error_after = {}, {}, {}, {}
    for name in tqdm(names, desc="LoRC", unit="layer", disable=not progress, leave=False):
        w0 = weight_matrix(modules[name]).detach()
        q = quantized.weights[name].to(w0)
        U, V = low_rank_factors(w0 - q, rank, factor_dtype)  # (out, r), (r, in)
        weights[name] = (q.double() + U.double() @ V.double()).to(w0.dtype)
        extra_params[name] = rank * sum(w0.shape)
        norm_w0 = float(w0.double().norm())
        error_before[name] = float((w0 - q).double().norm()) / norm_w0
        error_after[name] = float((w0.double() - weights[name].double()).norm()) / norm_w0
    seconds = time.perf_counter() - start
    factor_bits = 64 if factor_dtype is None else torch.finfo(factor_dtype).bits
    total_params = sum(extra_params.values())
    return QuantResult(
        weights=weights,
        format=quantized.format,
        method=f"{quantized.method}+lorc",
        settings={**quantized.settings, "lorc_rank": rank,
                  "lorc_factor_dtype": str(factor_dtype).removeprefix("torch.")},
        base_model=quantized.base_model,
        base_fingerprint=fingerprint,
        calibration=calib.provenance() if calib is not None else quantized.calibration,
        seconds=quantized.seconds + seconds,
        layer_mse=layer_mse(model, calib, weights, batch_size=batch_size) if calib is not None else {},
        extra={
            "base_method": quantized.method,
            "base_extra": quantized.extra,
            "lorc_seconds": seconds,
            "rank": rank,
            "extra_parameters": extra_params,
            "extra_parameters_total": total_params,
            "extra_bits_per_parameter": factor_bits,
            "extra_storage_bits_total": total_params * factor_bits,
            "relative_error_before": error_before,
            "relative_error_after": error_after,
            "layer_mse_inputs": "full-precision model" if calib is not None else None,
        },
    )
