"""Formats and grids (landscape/quant/formats.py) against brute force and the closed forms of the
conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape.quant.formats import FormatError, QuantFormat, make_grid, parse_format, sqnr_db


def random_weight(out_f: int = 6, in_f: int = 32, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(out_f, 1, generator=g, dtype=dtype) + 0.1  # rows with different ranges
    return torch.randn(out_f, in_f, generator=g, dtype=dtype) * scales


def brute_force_nearest(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int,
                        codes: range) -> np.ndarray:
    """Nearest lattice point of every entry by enumerating every integer code (no rounding formula)."""
    out = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            s, z = scale[i, j // group], zero[i, j // group]
            values = np.array([s * (q - z) for q in codes])
            out[i, j] = values[np.argmin(np.abs(values - w[i, j]))]
    return out


FORMATS = ["int4", "int3", "int2", "int4-sym", "int3-g8", "int4-g16-sym", "int8-tensor", "int3-tensor-sym",
           "mxint4-8", "mxint3-16"]


@pytest.mark.parametrize("spec", FORMATS)
def test_round_is_the_nearest_lattice_point(spec):
    fmt = parse_format(spec)
    w = random_weight()
    grid = make_grid(w, fmt)
    codes = range(fmt.qmin, fmt.qmax + 1)
    for probe in (w, 1.7 * w):  # 1.7 * w also exercises clamping at the ends of the code range
        expected = brute_force_nearest(probe.numpy(), grid.scale.numpy(), grid.zero.numpy(), grid.group_size,
                                       codes)
        np.testing.assert_allclose(grid.round(probe).numpy(), expected, rtol=0, atol=1e-12)


def test_asymmetric_channel_grid_closed_form():
    """int<b> per channel: scale = (max - min) / (2^b - 1) with the range widened to include 0, zero =
    round(-min/scale)."""
    w = random_weight(5, 24, seed=1)
    w[0] = w[0].abs() + 0.05  # an all-positive row: the range must be widened to include 0
    for bits in (2, 3, 4, 8):
        grid = make_grid(w, f"int{bits}")
        for i, row in enumerate(w.numpy()):
            lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
            scale = (hi - lo) / (2**bits - 1)
            assert grid.scale[i, 0].item() == pytest.approx(scale, rel=1e-12)
            assert grid.zero[i, 0].item() == round(-lo / scale)
        codes = grid.quantize(w)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        assert torch.equal(codes, codes.round())


def test_symmetric_group_grid_represents_each_groups_absmax_exactly():
    w = random_weight(4, 32, seed=2)
    grid = make_grid(w, "int4-g8-sym")
    assert grid.scale.shape == (4, 4) and torch.equal(grid.zero, torch.zeros(4, 4, dtype=w.dtype))
    absmax = w.abs().reshape(4, 4, 8).amax(-1)
    torch.testing.assert_close(grid.scale * 7, absmax, rtol=1e-14, atol=0)
    # the largest-magnitude weight of every group is a lattice point
    idx = w.abs().reshape(4, 4, 8).argmax(-1)
    largest = w.reshape(4, 4, 8).gather(-1, idx[..., None])[..., 0]
    rounded = grid.round(w).reshape(4, 4, 8).gather(-1, idx[..., None])[..., 0]
    torch.testing.assert_close(rounded, largest, rtol=1e-14, atol=0)


def test_tensor_granularity_has_one_scale():
    w = random_weight(6, 16, seed=3)
    grid = make_grid(w, "int4-tensor")
    assert torch.equal(grid.scale, grid.scale[0, 0].expand_as(grid.scale))
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    assert grid.scale[0, 0].item() == pytest.approx((hi - lo) / 15, rel=1e-12)


@pytest.mark.parametrize("bits, block", [(4, 8), (3, 16), (8, 32)])
def test_mx_scales_are_powers_of_two_and_fit_the_block_max(bits, block):
    w = random_weight(4, 32, seed=4, dtype=torch.float32)
    grid = make_grid(w, f"mxint{bits}-{block}")
    for s in grid.scale.flatten().tolist():
        mantissa, _ = math.frexp(s)
        assert mantissa == 0.5, f"scale {s} is not a power of two"
    # scale = 2^(floor(log2 absmax) - (bits - 2)): the block max codes to a magnitude in [2^(b-2), 2^(b-1))
    absmax = w.abs().reshape(4, 32 // block, block).amax(-1)
    ratio = absmax / grid.scale
    assert bool((ratio >= 2 ** (bits - 2)).all()) and bool((ratio < 2 ** (bits - 1)).all())
    assert parse_format(f"mxint{bits}_{block}") == QuantFormat(bits, True, "mx", block)


def test_all_zero_group_gets_scale_one_and_stays_zero():
    w = random_weight(3, 16, seed=5)
    w[1, :8] = 0
    grid = make_grid(w, "int4-g8")
    assert grid.scale[1, 0].item() == 1.0
    assert torch.equal(grid.round(w)[1, :8], torch.zeros(8, dtype=w.dtype))


@pytest.mark.parametrize("spec", FORMATS)
def test_contains_accepts_lattice_points_and_rejects_others(spec):
    w = random_weight(seed=6)
    grid = make_grid(w, spec)
    on_grid = grid.round(w)
    assert grid.contains(on_grid)
    per_column_scale = grid.scale.repeat_interleave(grid.group_size, dim=1)
    assert not grid.contains(on_grid + 0.3 * per_column_scale * (torch.arange(w.shape[1]) == 5))


def test_round_columns_equals_round_on_the_same_columns():
    w = random_weight(4, 32, seed=7)
    grid = make_grid(w, "int3-g8")
    full = grid.round(w)
    for start, stop in [(0, 8), (5, 19), (31, 32)]:
        torch.testing.assert_close(grid.round_columns(w[:, start:stop], start), full[:, start:stop], rtol=0,
                                   atol=0)


def test_fake_quant_is_round_forward_and_identity_backward():
    w = random_weight(seed=8).requires_grad_(True)
    grid = make_grid(w.detach(), "int3")
    out = grid.fake_quant(w)
    assert torch.equal(out.detach(), grid.round(w.detach()))
    (out * torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape)).sum().backward()
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape))


@pytest.mark.parametrize("spec", ["int4", "int3-g64", "int4-sym", "int8-tensor", "int2-g32-sym", "mxint4-32",
                                  "int5-tensor-sym"])
def test_names_round_trip(spec):
    fmt = parse_format(spec)
    assert parse_format(fmt.name) == fmt
    assert parse_format(fmt) is fmt


@pytest.mark.parametrize("spec, needle",
                         [("int9", "got 9"), ("int1", "got 1"), ("fp8", "fp8"), ("mxint4", "mxint4"),
                          ("int4-32", "int4-32"), ("int4-g0", "got 0"), ("int4-gx", "int4-gx")])
def test_bad_format_names_raise_naming_the_value(spec, needle):
    with pytest.raises(FormatError, match=needle):
        parse_format(spec)


def test_bad_format_fields_raise():
    with pytest.raises(FormatError, match="bits"):
        QuantFormat(9)
    with pytest.raises(FormatError, match="group_size"):
        QuantFormat(4, granularity="channel", group_size=64)
    with pytest.raises(FormatError, match="symmetric"):
        QuantFormat(4, symmetric=False, granularity="mx", group_size=32)


def test_group_that_does_not_divide_in_features_names_both():
    with pytest.raises(FormatError, match=r"group size 24 .* in_features=32"):
        make_grid(random_weight(4, 32), "int4-g24", name="layer.x")
    with pytest.raises(FormatError, match="layer.x"):
        parse_format("int4-g24").check_shape((4, 32), "layer.x")


def test_nan_weight_is_refused():
    w = random_weight(4, 16)
    w[2, 3] = float("nan")
    with pytest.raises(FormatError, match=r"NaN or Inf .*\[2, 3\]"):
        make_grid(w, "int4")


@pytest.mark.parametrize("spec", ["int4", "int3-sym", "int4-g16", "int2-g8-sym", "int8-tensor", "mxint4-8"])
def test_storage_bits(spec):
    """codes (b bits each) + per group: an fp16 scale and, if asymmetric, a b-bit zero point; MX: an 8-bit
    exponent."""
    fmt = parse_format(spec)
    out_f, in_f = 12, 32
    if fmt.granularity == "tensor":
        n_groups = 1
    elif fmt.granularity == "channel":
        n_groups = out_f
    else:
        n_groups = out_f * in_f // fmt.group_size
    per_group = 8 if fmt.granularity == "mx" else 16 + (0 if fmt.symmetric else fmt.bits)
    expected = out_f * in_f * fmt.bits + n_groups * per_group
    assert fmt.storage_bits((out_f, in_f)) == expected
    assert fmt.bits_per_weight((out_f, in_f)) == pytest.approx(expected / (out_f * in_f))


def test_sqnr_db():
    w = random_weight(seed=9)
    noise = 0.01 * random_weight(seed=10)
    expected = 10 * np.log10((w.numpy() ** 2).sum() / (noise.numpy() ** 2).sum())
    assert sqnr_db(w, w + noise) == pytest.approx(expected, rel=1e-12)
    assert sqnr_db(w, w) == math.inf
