"""Integer weight formats and the grid (lattice) they define on a weight matrix.

A :class:`QuantFormat` says *how* to quantize (bits, symmetric or asymmetric, granularity); a
:class:`Grid` is the lattice it defines on one ``(out_features, in_features)`` matrix: every column ``j``
of output row ``i`` may take the values ``scale[i, g(j)] * (q - zero[i, g(j)])`` for integer codes
``q`` in ``[qmin, qmax]``, where ``g(j) = j // group_size``.

**One grid for every method.** The grid of a layer is computed once from the pretrained weights w0
(min-max, static groups) and RTN, GPTQ and QAFT all round onto that same lattice, so their endpoints are
lattice points of one set and their displacements ``w_q - w0`` are directly comparable. Solvers never
compute scales themselves.

Format names (:func:`parse_format`):

============================  =============================================================
``int4``                      4-bit, asymmetric (zero point), one scale per output channel
``int4-sym``                  4-bit symmetric (codes -7..7), per output channel
``int4-g64`` / ``int4-g64-sym``  one scale (and zero) per group of 64 input columns
``int4-tensor``               one scale for the whole matrix
``int4-g32-fz``               asymmetric with a real-valued ("float") zero point: the lattice spans
                              exactly [min, max] of each group (GGUF Q4_1's grid)
``mxint4-32`` (``mxint4_32``)  MX block format: 4-bit symmetric elements, a shared power-of-two
                              scale (8-bit exponent) per block of 32 input columns
============================  =============================================================

Asymmetric formats use an integer zero point by default (the GPTQ convention: codes and zero point in
the same integer format, so 0.0 is exactly representable). SmolLM2-135M's GGUF weights lie on the
``int4-g32-fz`` lattice, where RTN is lossless; on ``int4-g32`` (integer zero point) it is not.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from landscape.weights import working_dtype

Granularity = Literal["tensor", "channel", "group", "mx"]
GRANULARITIES = ("tensor", "channel", "group", "mx")
SCALE_BITS = 16  # a per-group scale is stored in fp16 (MX: an 8-bit shared exponent)
MX_EXPONENT_BITS = 8
MIN_BITS, MAX_BITS = 2, 8


class FormatError(ValueError):
    """An invalid quantization format, or a format that does not fit a weight's shape."""


@dataclass(frozen=True)
class QuantFormat:
    """How weights are quantized. Validated on construction; see the module docstring for names."""

    bits: int
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    float_zero: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise FormatError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise FormatError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity in ("group", "mx"):
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise FormatError(f"granularity {self.granularity!r} needs a positive integer group_size, "
                                  f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise FormatError(f"group_size is only for 'group' and 'mx' granularity, not "
                              f"{self.granularity!r}")
        if self.granularity == "mx" and not self.symmetric:
            raise FormatError("MX block formats are symmetric: use symmetric=True")
        if self.float_zero and self.symmetric:
            raise FormatError("float_zero applies to asymmetric formats only (symmetric formats have no zero "
                              "point)")

    # ------------------------------------------------------------------------------------- naming
    @property
    def name(self) -> str:
        if self.granularity == "mx":
            return f"mxint{self.bits}-{self.group_size}"
        base = f"int{self.bits}"
        if self.granularity == "group":
            base += f"-g{self.group_size}"
        elif self.granularity == "tensor":
            base += "-tensor"
        return base + ("-sym" if self.symmetric else "-fz" if self.float_zero else "")

    def __str__(self) -> str:
        return self.name

    # ----------------------------------------------------------------------------------- the codes
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def group_size_for(self, in_features: int) -> int:
        """Columns sharing one scale in a matrix with ``in_features`` columns."""
        return self.group_size if self.granularity in ("group", "mx") else in_features

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Raise :class:`FormatError` unless this format can quantize a matrix of ``shape``."""
        if len(shape) != 2:
            raise FormatError(f"{name}: expected an (out_features, in_features) matrix, got shape "
                              f"{tuple(shape)}")
        in_features = shape[1]
        g = self.group_size_for(in_features)
        if in_features % g:
            divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
            raise FormatError(f"{name}: group size {g} of format {self.name} does not divide in_features="
                              f"{in_features}; group sizes that do: {divisors or 'none of 16..256'}")

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Bits needed to store a matrix of ``shape`` in this format (codes + scales + zero points)."""
        out_f, in_f = shape
        n_groups = 1 if self.granularity == "tensor" else out_f * (in_f // self.group_size_for(in_f))
        zero_bits = 0 if self.symmetric else SCALE_BITS if self.float_zero else self.bits
        per_group = MX_EXPONENT_BITS if self.granularity == "mx" else SCALE_BITS + zero_bits
        return out_f * in_f * self.bits + n_groups * per_group

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return self.storage_bits(shape) / (shape[0] * shape[1])


_FORMAT_RE = re.compile(r"^(?P<mx>mx)?int(?P<bits>\d+)"
                        r"(?:[-_](?:g(?P<group>\d+)|(?P<block>\d+)|(?P<tensor>tensor)))?"
                        r"(?P<sym>-sym|-fz)?$")


def parse_format(spec: str | QuantFormat) -> QuantFormat:
    """Parse a format name (``int4``, ``int3-g64``, ``int4-sym``, ``int8-tensor``, ``mxint4-32``)."""
    if isinstance(spec, QuantFormat):
        return spec
    m = _FORMAT_RE.match(str(spec).strip().lower())
    if not m or (m["mx"] and not m["block"]) or (m["block"] and not m["mx"]):
        raise FormatError(f"unknown format {spec!r}; accepted: int<b> (per-channel asymmetric), int<b>-sym, "
                          f"int<b>-g<G>[-sym|-fz], int<b>-tensor[-sym|-fz], int<b>-fz, mxint<b>-<block>, "
                          f"with b in {MIN_BITS}..{MAX_BITS}")
    bits = int(m["bits"])
    try:
        if m["mx"]:
            if m["sym"]:
                raise FormatError(f"MX formats are always symmetric; drop the suffix {m['sym']!r}")
            return QuantFormat(bits, True, "mx", int(m["block"]))
        sym, fz = m["sym"] == "-sym", m["sym"] == "-fz"
        if m["group"]:
            return QuantFormat(bits, sym, "group", int(m["group"]), float_zero=fz)
        return QuantFormat(bits, sym, "tensor" if m["tensor"] else "channel", float_zero=fz)
    except FormatError as err:  # name the format the user wrote, not only the field
        raise FormatError(f"format {spec!r}: {err}") from None


# ----------------------------------------------------------------------------------------------- grid
def in_working_dtype(method: Callable[[Grid, torch.Tensor], torch.Tensor]
                     ) -> Callable[[Grid, torch.Tensor], torch.Tensor]:
    """A grid method on a bfloat16 / float16 tensor: computed in float32, the result cast to the tensor's
    dtype once (:func:`landscape.weights.working_dtype`); other dtypes pass through."""
    @functools.wraps(method)
    def wrapper(grid: Grid, t: torch.Tensor) -> torch.Tensor:
        work = working_dtype(t.dtype)
        return method(grid, t) if work == t.dtype else method(grid, t.to(work)).to(t.dtype)

    return wrapper


@dataclass(frozen=True)
class Grid:
    """The lattice of one ``(out, in)`` matrix: ``value = scale * (q - zero)`` with ``q`` in ``[qmin, qmax]``.

    ``scale`` and ``zero`` are ``(out, n_groups)``; column ``j`` uses group ``j // group_size``.
    """

    fmt: QuantFormat
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scale.shape[0], self.scale.shape[1] * self.group_size)

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        """Expand a per-group ``(out, n_groups)`` tensor (``scale``, ``zero``) to ``(out, in)``."""
        return t.repeat_interleave(self.group_size, dim=1)  # (out, in)

    @in_working_dtype
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (same dtype as ``w``, integral values) of the nearest lattice points of ``w``.

        ``q = clamp(round(w / scale + zero), qmin, qmax)``; with an integer zero point this equals the usual
        ``round(w / scale) + zero``, with a real-valued one (``-fz``) the lattice is offset by ``zero``.
        (bfloat16 / float16: computed in float32, the codes cast once.)
        """
        s, z = self.per_column(self.scale).to(w), self.per_column(self.zero).to(w)
        return torch.clamp(torch.round(w / s + z), self.fmt.qmin, self.fmt.qmax)

    @in_working_dtype
    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Lattice values ``scale * (q - zero)`` of codes ``q`` (in ``q``'s dtype; computed in float32 and
        cast once for bfloat16 / float16)."""
        s, z = self.per_column(self.scale).to(q), self.per_column(self.zero).to(q)
        return s * (q - z)

    @in_working_dtype
    def round(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest lattice point of every entry of ``w`` (round-to-nearest, clamped to the code range), in
        ``w``'s dtype (for bfloat16 / float16: found in float32 and rounded to that dtype once)."""
        return self.dequantize(self.quantize(w))

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """``round(w)`` in the forward pass, identity gradient in the backward pass (straight-through)."""
        return w + (self.round(w) - w).detach()

    def round_columns(self, w: torch.Tensor, start: int) -> torch.Tensor:
        """Round the columns ``start : start + w.shape[1]`` of the matrix (GPTQ rounds column blocks)."""
        cols = torch.arange(start, start + w.shape[1], device=self.scale.device) // self.group_size
        return self.round_on(w, self.scale[:, cols].to(w), self.zero[:, cols].to(w))

    def round_on(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Nearest lattice point of ``w`` given its columns' ``scale`` and ``zero`` (broadcastable to ``w``).

        For solvers that visit columns one at a time (GPTQ): pass the column's group's ``scale[:, g]`` and
        ``zero[:, g]``.
        """
        return scale * (torch.clamp(torch.round(w / scale + zero), self.fmt.qmin, self.fmt.qmax) - zero)

    def contains(self, w: torch.Tensor, rtol: float = 1e-5) -> bool:
        """True if every entry of ``w`` is a lattice point (up to float tolerance relative to the scale; for
        bfloat16 / float16 weights also up to their own rounding of the lattice value)."""
        s = self.per_column(self.scale).to(w)
        tolerance = rtol * s
        if w.dtype != working_dtype(w.dtype):
            w, s = w.to(working_dtype(w.dtype)), s.to(working_dtype(w.dtype))
            tolerance = rtol * s + torch.finfo(tolerance.dtype).eps * w.abs()
        return bool(((w - self.round(w)).abs() <= tolerance).all())

    def to(self, *args, **kwargs) -> "Grid":
        return Grid(self.fmt, self.scale.to(*args, **kwargs), self.zero.to(*args, **kwargs), self.group_size)

    @staticmethod
    def stack_rows(grids: Sequence[Grid]) -> Grid:
        """The grid of the matrices of ``grids`` stacked along their rows (``torch.cat(ws, 0)``): each row
        keeps its own scale and zero point. The grids must share the format and the group size (same
        ``in``); a per-tensor grid's scale is already stored per row, so it stacks too."""
        first = grids[0]
        for g in grids[1:]:
            if (g.fmt, g.group_size, g.shape[1]) != (first.fmt, first.group_size, first.shape[1]):
                raise ValueError(f"cannot stack grids of formats {first.fmt.name} (group {first.group_size}, "
                                 f"shape {first.shape}) and {g.fmt.name} (group {g.group_size}, "
                                 f"shape {g.shape})")
        return Grid(first.fmt, torch.cat([g.scale for g in grids]), torch.cat([g.zero for g in grids]),
                    first.group_size)


def make_grid(w: torch.Tensor, fmt: QuantFormat | str, name: str = "weight") -> Grid:
    """The min-max lattice of ``fmt`` on ``w`` (the pretrained weights; computed once, shared by all methods).

    Asymmetric: ``scale = (max - min) / qmax`` and ``zero = round(-min / scale)`` with the range widened
    to include 0 (``float_zero``: ``zero = -min / scale`` unrounded, the range not widened); symmetric:
    ``scale = absmax / qmax``; MX: ``scale = 2^(floor(log2 absmax) - (bits - 2))``.
    Groups whose weights are all zero get scale 1 (any scale represents them exactly).
    """
    fmt = parse_format(fmt)
    fmt.check_shape(tuple(w.shape), name)
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise FormatError(f"{name}: weights contain NaN or Inf (first at index {bad}); cannot build a grid")
    out_f, in_f = w.shape
    g = fmt.group_size_for(in_f)
    wd = w.detach().to(working_dtype(w.dtype))  # bfloat16 / float16 weights: the grid in float32
    wg = wd.reshape(out_f, in_f // g, g)  # (out, n_groups, g)
    if fmt.granularity == "tensor":
        wg = wd.reshape(1, 1, -1)
    if fmt.symmetric:
        absmax = wg.abs().amax(dim=-1)
        if fmt.granularity == "mx":
            exp = torch.floor(torch.log2(absmax.clamp_min(torch.finfo(wd.dtype).tiny)))
            scale = torch.pow(2.0, exp - (fmt.bits - 2)).to(wd.dtype)
        else:
            scale = absmax / fmt.qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        if not fmt.float_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / fmt.qmax
        zero = -lo / torch.where(scale > 0, scale, torch.ones_like(scale))
        if not fmt.float_zero:
            zero = torch.round(zero)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if fmt.granularity == "tensor":
        scale, zero = scale.expand(out_f, 1).clone(), zero.expand(out_f, 1).clone()
    return Grid(fmt, scale, zero, g)


def sqnr_db(w: torch.Tensor, w_q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||w||^2 / ||w - w_q||^2)`` in dB."""
    err = (w - w_q).double().pow(2).sum()
    return math.inf if err == 0 else float(10 * torch.log10(w.double().pow(2).sum() / err))
