"""GPTQ (Frantar et al., 2023): layer-wise quantization with second-order error feedback.

For one linear layer with weight ``W`` (``(out, in)``) and inputs ``x``, GPTQ minimises the local
output error ``||W x - Q x||^2`` over lattice points ``Q``. With ``H = 2/n sum x x^T`` it rounds the
columns one at a time and spreads each column's rounding error over the columns not yet rounded,
using the upper Cholesky factor ``U`` of ``(H + lambda I)^-1``:

    for each column j (in act-order: decreasing H_jj):
        q_j   = round(w_j)                       # onto the grid of the pretrained w0
        e_j   = (w_j - q_j) / U_jj
        w_k  -= e_j * U_jk   for every k > j      # error feedback

Lazy batch updates apply the feedback inside a block of ``block_size`` columns at once per column and
to the columns after the block only once per block (one matrix product). The grid is not the solver's
business: it comes from :func:`landscape.quant.formats.make_grid` on w0 (static groups), and rounding
happens only through the grid's rounding (:meth:`Grid.round_on`), so RTN, GPTQ and QAFT land on the same
lattice; with act-order each column keeps its own group's scale.

Damping ``lambda = damp * mean(diag H)``; if a Cholesky factorisation fails, ``damp`` is multiplied by
10 (at most ``max_escalations`` times) and the value used is recorded. Inputs never active on the
calibration data (``H_jj = 0``) get ``H_jj = 1`` and plain rounding; their weights are *not* zeroed
(the displacement ``w_q - w0`` is what the study measures).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from landscape.data import TokenSet
from landscape.quant.capture import (
    check_batch_size,
    check_calibration,
    check_compute_dtype,
    quantize_block_by_block,
    resolve_layers,
)
from landscape.quant.formats import Grid, QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult
from landscape.weights import Base, LayerSelection, as_base

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
MAX_DAMP_ESCALATIONS = 4  # 0.01 -> 0.1 -> 1 -> 10 -> 100 x mean diag H


class CholeskyError(ValueError):
    """The damped Hessian could not be factorised at any damping tried."""


@dataclass(frozen=True)
class GPTQLayerInfo:
    """What :func:`gptq_layer` did on one layer.

    Attributes:
        damp: relative damping used (fraction of ``mean(diag H)``), after any escalation.
        damp_absolute: ``lambda`` added to the diagonal of ``H``.
        escalations: how many times the damping was multiplied by 10 after a failed Cholesky.
        dead_inputs: input columns with ``H_jj == 0`` (left to plain rounding).
        act_order: whether columns were processed in decreasing ``H_jj`` order.
        block_size: columns per lazy-update block.
    """

    damp: float
    damp_absolute: float
    escalations: int
    dead_inputs: int
    act_order: bool
    block_size: int


def check_solver_settings(damp: float, block_size: int, max_escalations: int = MAX_DAMP_ESCALATIONS) -> None:
    """Raise ``ValueError`` for a damping that is not a positive finite number or a bad block size."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a positive finite fraction of mean(diag H) (e.g. 0.01), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (e.g. 128), got {block_size!r}")
    if isinstance(max_escalations, bool) or not isinstance(max_escalations, int) or max_escalations < 0:
        raise ValueError(f"max_escalations must be a non-negative integer, got {max_escalations!r}")


@dataclass(frozen=True)
class GPTQSettings:
    """The settings of a GPTQ run, validated on construction (``ValueError`` naming the bad one).

    Attributes:
        damp: relative damping, ``lambda = damp * mean(diag H)`` (a fraction; multiplied by 10 on a failed
            Cholesky factorisation, at most ``max_escalations`` times).
        block_size: columns per lazy batch update (128 in the paper; any value gives the same result up to
            float rounding).
        act_order: process columns in decreasing ``H_jj`` (the paper's "act-order" heuristic).
        sequential: the inputs of block ``i`` come from the already quantized blocks ``< i`` (see
            :func:`landscape.quant.capture.quantize_block_by_block`); False: every layer sees the
            full-precision model's inputs.
        true_sequential: within a block, a layer's inputs also reflect the quantized layers before it
            (only with ``sequential``).
        one_pass: with ``true_sequential``, each block runs once, its calibration forwards paused at each
            group of layers until the group is solved (every call's activations alive at once: on a 7B Llama
            at 128 x 2,048 tokens about 10 GB in bf16); ``False`` replays the block once per group instead
            (one call's activations at a time, about 1.65x the time on SmolLM2). Identical weights either way.
        compute_dtype: dtype of the solver (the Cholesky factor and the error feedback): float64, float32, or
            ``None`` (default): float64 for float32 / float64 weights, float32 for bfloat16 / float16 ones
            (:meth:`solver_dtype`), as the reference implementation does: a float64 solve of a wide layer
            holds two ``(in, in)`` float64 matrices, 1 GiB at 8,192 inputs, which is half a 1B bf16 model.
        hessian_dtype: dtype in which ``H = 2/n sum x x^T`` is accumulated (float32, as in the reference
            implementation: 2-2.5x faster on CPU than float64, the ``x x^T`` products dominating the cost;
            float64 for exact comparisons). It is converted to ``compute_dtype`` before the solver runs.
        max_escalations: damping escalations allowed before :class:`CholeskyError`.
    """

    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK_SIZE
    act_order: bool = True
    sequential: bool = True
    true_sequential: bool = True
    one_pass: bool = True
    compute_dtype: torch.dtype | None = None
    hessian_dtype: torch.dtype = torch.float32
    max_escalations: int = MAX_DAMP_ESCALATIONS

    def __post_init__(self) -> None:
        check_solver_settings(self.damp, self.block_size, self.max_escalations)
        for name in ("act_order", "sequential", "true_sequential", "one_pass"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.compute_dtype is not None:
            check_compute_dtype(self.compute_dtype)
        check_compute_dtype(self.hessian_dtype, "hessian_dtype")

    def solver_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The solver's dtype for weights of ``weight_dtype``: :attr:`compute_dtype`, or when that is ``None``
        float32 for bfloat16 / float16 weights and float64 otherwise."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float32 if weight_dtype in (torch.bfloat16, torch.float16) else torch.float64


def _check_layer_problem(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, name: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{name}: weight must be an (out, in) matrix, got shape {tuple(w.shape)}")
    n_in = w.shape[1]
    if tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(f"{name}: Hessian must be ({n_in}, {n_in}) for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if grid.shape != tuple(w.shape):
        raise ValueError(f"{name}: grid is for shape {grid.shape}, weight has shape {tuple(w.shape)}")
    for what, t in (("weight", w), ("Hessian", hessian)):
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise ValueError(f"{name}: {what} contains NaN or Inf (first at index {bad}); refusing to "
                             f"quantize")
    min_diag = float(hessian.diagonal().min())
    if min_diag < 0:
        raise ValueError(f"{name}: Hessian has a negative diagonal entry ({min_diag:.3g}); a second-moment "
                         f"matrix 2/n sum x x^T has diag >= 0")


def inverse_cholesky_upper(
    hessian: torch.Tensor, damp: float, max_escalations: int = MAX_DAMP_ESCALATIONS, name: str = "layer", *,
    rebuild: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` with ``lambda = damp * mean(diag H)``.

    On a failed factorisation the relative damping is multiplied by 10, at most ``max_escalations``
    times. Returns ``(U, damp_used, lambda_used, escalations)``; raises :class:`CholeskyError` when every
    damping failed.

    ``rebuild``: a function that makes ``hessian`` again. Then ``hessian`` is consumed (pass a fresh tensor
    nobody else holds): it is damped in place and let go once factorised, and rebuilt only if a later step
    fails, so at most two ``(in, in)`` matrices exist at once instead of three (a 7B layer's 11,008 inputs:
    1 GB each in float64). The numbers are the same either way.
    """
    mean_diag = float(hessian.diagonal().mean())
    undamped = hessian.diagonal().clone()
    tried = []
    for escalations in range(max_escalations + 1):
        rel = damp * 10.0**escalations
        lam = rel * mean_diag
        tried.append(rel)
        if hessian is None:
            hessian = rebuild()
        damped = hessian if rebuild is not None else hessian.clone()
        damped.diagonal().copy_(undamped + lam)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if rebuild is not None:
            hessian = None  # factorised: let it go (rebuilt if a later step fails)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(upper).all():
                return upper, rel, lam, escalations
    if rebuild is not None:  # the undamped matrix again, for the message
        hessian = rebuild()
    raise CholeskyError(f"{name}: Cholesky of the damped Hessian failed at every damping tried "
                        f"({', '.join(f'{d:g}' for d in tried)} x mean diag H = {mean_diag:.3g}); the "
                        f"Hessian is not positive semi-definite (smallest eigenvalue "
                        f"{float(torch.linalg.eigvalsh(hessian)[0]):.3g})")


@torch.no_grad()
def gptq_layer(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    settings: GPTQSettings = GPTQSettings(),
    *,
    name: str = "layer",
) -> tuple[torch.Tensor, GPTQLayerInfo]:
    """GPTQ on one layer: the lattice point ``Q`` of ``grid`` that GPTQ finds for ``w`` under ``hessian``.

    Args:
        w: pretrained ``(out, in)`` weight w0.
        hessian: ``(in, in)`` ``H = 2/n sum x x^T`` of the layer's calibration inputs (undamped).
        grid: the format's lattice on w0 (:func:`make_grid`); columns round with their own group's scale.
        settings: ``damp``, ``block_size``, ``act_order``, ``compute_dtype`` and ``max_escalations`` apply
            (see :class:`GPTQSettings`); the result is returned in ``w``'s dtype.
        name: the layer's name, in error messages.

    Returns:
        ``(w_q, info)``: ``w_q`` ``(out, in)`` on ``grid``, in ``w``'s dtype and device; see
        :class:`GPTQLayerInfo`.
    """
    if not isinstance(settings, GPTQSettings):
        raise TypeError(f"settings must be a GPTQSettings, got {type(settings).__name__}")
    _check_layer_problem(w, hessian, grid, name)
    damp, block_size, act_order = settings.damp, settings.block_size, settings.act_order
    compute_dtype = settings.solver_dtype(w.dtype)
    n_in = w.shape[1]
    diagonal = hessian.detach().diagonal().to(device=w.device, dtype=compute_dtype).clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    if act_order:
        perm = torch.argsort(diagonal, descending=True, stable=True)
    else:
        perm = torch.arange(n_in, device=w.device)

    def permuted_hessian() -> torch.Tensor:
        """H in the compute dtype, dead inputs' diagonal set to 1, rows and columns in processing order."""
        H = hessian.detach().to(device=w.device, dtype=compute_dtype).clone()  # (in, in)
        H.diagonal()[dead] = 1.0
        H = H.index_select(0, perm)  # two steps: at most two (in, in) copies at once
        return H.index_select(1, perm)

    # U: (in, in), upper triangular; the permuted H is handed over whole and let go once factorised
    U, damp_used, lam, escalations = inverse_cholesky_upper(
        permuted_hessian(), damp, settings.max_escalations, name, rebuild=permuted_hessian)
    # Columns are rows of the transposed matrices below, so every per-column step reads and writes contiguous
    # memory (a column of an (out, in) row-major matrix is strided: one cache line per entry).
    WT = w.detach().T.to(compute_dtype)[perm].contiguous()  # (in, out): processing order, error-fed as we go
    # Each column's grid scale and zero point are its group's: (n_groups, out) rows, looked up per column in
    # the processing order (not expanded to (in, out): two more layer-sized matrices in the solver's dtype).
    scale, zero = grid.scale.to(WT).T.contiguous(), grid.zero.to(WT).T.contiguous()  # (n_groups, out)
    group_of = (perm // grid.group_size).tolist()  # the group of each column, in processing order

    QT = torch.empty_like(WT)  # (in, out)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = WT[i1:i2]  # (b, out) view: the block's columns, error-fed as we go
        E1 = torch.empty_like(W1)  # scaled rounding errors (w_j - q_j) / U_jj
        for j in range(i2 - i1):
            w_j = W1[j]  # (out,)
            g = group_of[i1 + j]
            q_j = grid.round_on(w_j, scale[g], zero[g])
            QT[i1 + j] = q_j
            E1[j] = (w_j - q_j) / U[i1 + j, i1 + j]
            W1[j + 1 :] -= U[i1 + j, i1 + j + 1 : i2, None] * E1[j]  # (b - j - 1, out) rank-1 update
        WT[i2:] -= U[i1:i2, i2:].T @ E1  # lazy batch update of every later column

    w_q = torch.empty(w.shape, dtype=QT.dtype, device=QT.device)  # (out, in)
    w_q[:, perm] = QT.T  # undo the act-order permutation
    info = GPTQLayerInfo(damp_used, lam, escalations, int(dead.sum()), act_order, block_size)
    return w_q.to(w.dtype), info


def gptq_group(
    ws: list[torch.Tensor],
    hessian: torch.Tensor,
    grids: list[Grid],
    settings: GPTQSettings = GPTQSettings(),
    *,
    names: list[str] | None = None,
) -> list[tuple[torch.Tensor, GPTQLayerInfo]]:
    """GPTQ on layers that read the same input (q/k/v, gate/up): one problem, their rows stacked.

    GPTQ's rows are independent given ``H``: the act-order permutation, the damping and the Cholesky factor
    depend on ``H`` alone, and each row's error feedback stays in its row. So the stacked problem gives every
    layer exactly what :func:`gptq_layer` gives it alone, with one factorisation and one column loop for the
    group instead of one per layer. Returns ``(w_q, info)`` per layer, in the order given.
    """
    names = names or [f"layer {i}" for i in range(len(ws))]
    if len(ws) == 1:
        return [gptq_layer(ws[0], hessian, grids[0], settings, name=names[0])]
    for w, grid, name in zip(ws, grids, names, strict=True):
        _check_layer_problem(w, hessian, grid, name)
    w_q, info = gptq_layer(torch.cat(ws), hessian, Grid.stack_rows(grids), settings, name=" + ".join(names))
    return [(part, info) for part in w_q.split([w.shape[0] for w in ws])]


def gptq(
    model: nn.Module | Base,
    calib: TokenSet,
    fmt: QuantFormat | str,
    settings: GPTQSettings = GPTQSettings(),
    *,
    layers: LayerSelection = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantResult:
    """Quantize the decoder-block linear layers of ``model`` with GPTQ on the calibration set ``calib``.

    Every argument is validated (format against every layer's shape, finite weights, token ids, solver
    settings) before any forward pass. Blocks are processed in order (see
    :func:`landscape.quant.capture.quantize_block_by_block` for ``settings.sequential`` and
    ``settings.true_sequential``); layers that read one input (q/k/v, gate/up) are solved together
    (:func:`gptq_group`); each layer's grid is ``make_grid(w0, fmt)``. The model is left with its
    weights w0 (bit-exact).

    Args:
        model: the model at w0, or its :class:`~landscape.weights.Base` (whose label is recorded as
            ``base_model``; default label: the config's ``name_or_path``).
        fmt: a :class:`QuantFormat` or a name such as ``"int3-g128"``.
        settings: the solver's settings (:class:`GPTQSettings`: damping, block size, act-order, sequential
            inputs, dtypes).
        layers: layer names or glob patterns (default: every quantizable layer).
        batch_size: calibration segments per forward pass (memory only).

    Returns:
        A :class:`QuantResult` with the quantized weights (model dtype and device), per-layer local MSE
        on the inputs each layer was solved on (``extra["layer_mse_inputs"]`` says which), damping used
        per layer, solver seconds per layer, settings and calibration provenance.
    """
    base = as_base(model)
    fmt = parse_format(fmt)
    if not isinstance(settings, GPTQSettings):
        raise TypeError(f"settings must be a GPTQSettings, got {type(settings).__name__}")
    check_batch_size(batch_size)
    names = resolve_layers(base.model, layers, fmt)
    check_calibration(base.model, calib)

    start = time.perf_counter()

    def solve(group: list[str], w0s: list[torch.Tensor], hessian: torch.Tensor):
        grids = [make_grid(w0, fmt, name) for name, w0 in zip(group, w0s)]
        return gptq_group(w0s, hessian, grids, settings, names=group)

    solved = quantize_block_by_block(base.model, calib, names, solve, sequential=settings.sequential,
                                     true_sequential=settings.true_sequential, one_pass=settings.one_pass,
                                     batch_size=batch_size,
                                     compute_dtype=settings.hessian_dtype, progress=progress)
    seconds = time.perf_counter() - start
    return QuantResult(
        weights={n: s.weight for n, s in solved.items()},
        format=fmt,
        method="gptq",
        settings={
            "damp": settings.damp,
            "block_size": settings.block_size,
            "act_order": settings.act_order,
            "sequential": settings.sequential,
            "true_sequential": settings.true_sequential and settings.sequential,
            "batch_size": batch_size,
            "compute_dtype": str(settings.solver_dtype(next(base.model.parameters()).dtype)).removeprefix(
                "torch."),
            "hessian_dtype": str(settings.hessian_dtype).removeprefix("torch."),
            "grid": "min-max of w0, static groups",
            "layers": layers if layers is None or isinstance(layers, str) else list(layers),
        },
        base_model=base.label,
        base_fingerprint=base.fingerprint(names),
        calibration=calib.provenance(),
        seconds=seconds,
        layer_mse={n: s.output_mse for n, s in solved.items()},
        extra={
            "layer_mse_inputs": "quantized earlier layers (sequential)" if settings.sequential
            else "full-precision model",
            "damp_used": {n: s.info.damp for n, s in solved.items()},
            "damp_escalations": sum(s.info.escalations for s in solved.values()),
            "dead_inputs": {n: s.info.dead_inputs for n, s in solved.items() if s.info.dead_inputs},
            "layer_seconds": {n: round(s.seconds, 4) for n, s in solved.items()},
        },
    )
