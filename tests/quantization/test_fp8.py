from __future__ import annotations

import math

import pytest
import torch

from mixquant.quantization import fp8


# Every non-negative finite e4m3fn value, ascending; the index is the byte.
NON_NEGATIVE_FP8 = torch.arange(127, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _reference_round(values: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3fn value by brute force; a tie goes to the even byte (mantissa LSB 0)."""
    grid = NON_NEGATIVE_FP8.double()
    out = []
    for v in values.tolist():
        distance = (grid - abs(v)).abs()
        tied = (distance == distance.min()).nonzero().flatten().tolist()
        pick = next(i for i in tied if i % 2 == 0) if len(tied) > 1 else tied[0]
        out.append(math.copysign(grid[pick].item(), v))
    return torch.tensor(out, dtype=torch.float32)


def test_rowwise_scale_is_row_amax_over_448_in_float32():
    x = torch.randn(6, 64) * torch.tensor([1e-3, 0.1, 1.0, 7.0, 300.0, 1e4]).unsqueeze(1)
    q, scale = fp8.quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 1)
    assert torch.equal(scale, x.abs().amax(dim=1, keepdim=True) / 448.0)


def test_leading_dims_and_16_bit_inputs():
    x = torch.randn(2, 3, 32).bfloat16()
    q, scale = fp8.quantize_rowwise(x)
    assert q.shape == (2, 3, 32) and scale.shape == (2, 3, 1)
    q32, scale32 = fp8.quantize_rowwise(x.float())
    assert torch.equal(q.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(scale, scale32)


@pytest.mark.parametrize("power", [-8, 0, 5])
def test_cast_rounds_to_nearest_even_at_every_midpoint(power):
    midpoints = (NON_NEGATIVE_FP8[:-1] + NON_NEGATIVE_FP8[1:]) / 2  # exact in float32
    just_below = torch.nextafter(midpoints, torch.zeros_like(midpoints))
    just_above = torch.nextafter(midpoints, torch.full_like(midpoints, 1e9))
    values = torch.cat([midpoints, just_below, just_above, torch.rand(200) * 448])
    values = torch.cat([values, -values])
    # The row's amax is 448 * 2^power, so the scale is the exact power of two and x / scale is exact.
    row = torch.cat([torch.tensor([448.0]), values]) * 2.0**power
    q, scale = fp8.quantize_rowwise(row.unsqueeze(0))
    assert scale.item() == 2.0**power
    assert torch.equal(q.float()[0, 1:], _reference_round(values))


def test_amax_element_maps_exactly_to_448_without_overflow():
    # For about a tenth of these, amax / (amax / 448) rounds to 448.00003 in float32.
    amax = torch.rand(4096) * 10 + 1e-3
    rows = torch.stack([amax, -amax, amax / 3], dim=1)
    q, _ = fp8.quantize_rowwise(rows)
    assert torch.all(q.float()[:, 0] == 448.0) and torch.all(q.float()[:, 1] == -448.0)
    assert not q.float().isnan().any()


def test_zero_row_gets_a_positive_scale_and_zero_codes():
    x = torch.randn(3, 32)
    x[1] = 0.0
    q, scale = fp8.quantize_rowwise(x)
    assert scale[1].item() > 0 and torch.isfinite(scale).all()
    assert torch.all(q.float()[1] == 0)
    assert torch.all(fp8.dequantize_rowwise(q, scale)[1] == 0)


def test_dequant_relative_error_is_within_half_ulp_of_e4m3():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64).unsqueeze(1)
    q, scale = fp8.quantize_rowwise(x)
    x_hat = fp8.dequantize_rowwise(q, scale)
    normal = x.abs() / scale >= 2.0**-6  # e4m3's smallest normal: below it the spacing is absolute
    relative = ((x_hat - x).abs() / x.abs())[normal]
    assert relative.max().item() <= 2.0**-4
    assert normal.float().mean() > 0.9


def test_dequantize_casts_to_the_requested_dtype():
    q, scale = fp8.quantize_rowwise(torch.randn(4, 32))
    out = fp8.dequantize_rowwise(q, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (q.float() * scale).bfloat16())


def test_scaled_mm_reference_matches_float64_of_the_dequantized_operands():
    x, w = torch.randn(33, 128) * 3, torch.randn(48, 128) * 0.02
    xq, x_scale = fp8.quantize_rowwise(x)
    wq, w_scale = fp8.quantize_rowwise(w)
    out = fp8.scaled_mm_reference(xq, x_scale, wq, w_scale, torch.float32)
    x_hat, w_hat = xq.double() * x_scale.double(), wq.double() * w_scale.double()
    exact = x_hat @ w_hat.t()
    # float32 accumulation of exact fp8 products: error bounded by K ulps of the sum of magnitudes.
    bound = 128 * 2.0**-24 * (x_hat.abs() @ w_hat.abs().t())
    assert out.shape == (33, 48) and out.dtype == torch.float32
    assert torch.all((out.double() - exact).abs() <= bound)


def test_scaled_mm_reference_output_dtype_and_tensorwise_scales():
    xq, x_scale = fp8.quantize_rowwise(torch.randn(16, 32))
    wq, w_scale = fp8.quantize_rowwise(torch.randn(16, 32))
    out = fp8.scaled_mm_reference(xq, x_scale, wq, w_scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp8.scaled_mm_reference(xq, x_scale, wq, w_scale, torch.float32).bfloat16())
    scalar = fp8.scaled_mm_reference(xq, torch.tensor(0.5), wq, torch.tensor(2.0), torch.float32)
    assert torch.equal(scalar, xq.float() @ wq.float().t())
