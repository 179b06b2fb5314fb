from __future__ import annotations

import pytest
import torch

from mixquant.quantization import nvfp4

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def reference_code(v: float) -> int:
    """Nearest E2M1 magnitude by brute force (saturating at 6), ties to the even index; sign bit for v < 0."""
    magnitude = min(abs(v), 6.0)
    distance = [abs(magnitude - g) for g in GRID]
    tied = [i for i, d in enumerate(distance) if d == min(distance)]
    index = next(i for i in tied if i % 2 == 0) if len(tied) > 1 else tied[0]
    return (8 if v < 0 else 0) | index


def reference_codes(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([reference_code(v) for v in x.flatten().tolist()], dtype=torch.uint8).reshape(x.shape)


def reference_fake_quant(w: torch.Tensor, gs: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """formats.md 1.3 written out: (codes, block scales, dequantized), float32, per-tensor gs."""
    blocks = w.float().reshape(w.shape[0], -1, 16)
    gs_t = torch.tensor(gs, dtype=torch.float32)
    s = (gs_t * (blocks.abs().amax(-1) / 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    s[s == 0] = 0.125
    d = (s / gs_t).unsqueeze(-1)
    codes = reference_codes((blocks / d).clamp(-6, 6))
    magnitudes = torch.tensor(GRID)[(codes & 7).long()]
    values = torch.where(codes >= 8, -magnitudes, magnitudes)
    return codes.reshape(w.shape), s, (values * d).reshape(w.shape)


def _float32_neighbours(values: list[float]) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    down = torch.nextafter(t, torch.full_like(t, -1e9))
    up = torch.nextafter(t, torch.full_like(t, 1e9))
    return torch.cat([t, down, up])


def test_code_table():
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert nvfp4.E2M1_VALUES.dtype == torch.float32
    assert nvfp4.E2M1_VALUES.tolist() == expected
    assert nvfp4.E2M1_VALUES[8].item() == 0.0 and nvfp4.E2M1_VALUES.signbit()[8]
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(nvfp4.e2m1_codes_to_float(codes), torch.tensor(expected))
    assert nvfp4.FP4_MAX == 6.0 and nvfp4.BLOCK_SIZE == 16


def test_every_threshold_and_both_sides_of_each_tie():
    magnitudes = _float32_neighbours(list(BOUNDARIES) + list(GRID) + [6.5, 1e30, float("inf")])
    x = torch.cat([magnitudes, -magnitudes])
    assert torch.equal(nvfp4.cast_to_e2m1_codes(x), reference_codes(x))


@pytest.mark.parametrize("value,code", [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
                                        (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14),
                                        (-5.0, 14), (7.0, 7), (-7.0, 15)])
def test_ties_go_to_the_even_code(value, code):
    assert nvfp4.cast_to_e2m1_codes(torch.tensor([value])).item() == code


def test_random_values_match_brute_force():
    x = torch.cat([torch.randn(3000) * 3, (torch.rand(1000) - 0.5) * 16])
    assert torch.equal(nvfp4.cast_to_e2m1_codes(x), reference_codes(x))


def test_sign_of_zero():
    codes = nvfp4.cast_to_e2m1_codes(torch.tensor([0.0, -0.0, -0.1, 0.1]))
    assert codes.tolist() == [0, 0, 8, 0]  # documented: negatives rounding to zero keep the sign bit
    assert nvfp4.e2m1_codes_to_float(codes).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_nibble_order_on_hand_built_bytes():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 8, 7]], dtype=torch.uint8)
    packed = nvfp4.pack_e2m1(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0x78]]
    assert nvfp4.unpack_e2m1(torch.tensor([[0xF1, 0x0A]], dtype=torch.uint8)).tolist() == [[1, 15, 10, 0]]


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = nvfp4.pack_e2m1(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(nvfp4.unpack_e2m1(packed), codes)
    with pytest.raises(ValueError, match="even"):
        nvfp4.pack_e2m1(torch.zeros(2, 3, dtype=torch.uint8))


def test_global_scale_formula():
    amax = torch.rand(5, 1) * 10 + 1e-3
    gs = nvfp4.global_scale_from_amax(amax)
    assert gs.dtype == torch.float32 and gs.shape == (5, 1)
    # compressed-tensors' `2688.0 / amax` is evaluated by torch as reciprocal(amax) * 2688
    assert torch.equal(gs, torch.reciprocal(amax) * 2688.0)
    assert not torch.equal(torch.reciprocal(amax) * 2688.0, torch.full_like(amax, 2688.0).div(amax))
    assert nvfp4.global_scale_from_amax(torch.tensor(2688.0)).item() == 1.0
    degenerate = nvfp4.global_scale_from_amax(torch.tensor([0.0, float("nan")]))
    assert degenerate.tolist() == [1.0, 1.0]


def test_global_scale_is_computed_in_the_dtype_of_amax():
    amax = torch.tensor([0.0371], dtype=torch.bfloat16)
    gs = nvfp4.global_scale_from_amax(amax)
    assert gs.dtype == torch.float32
    assert gs.item() == (amax.reciprocal() * 2688.0).item()  # bf16, as llm-compressor's observers produce it
    assert gs.item() != (amax.float().reciprocal() * 2688.0).item()


def test_block_scales_follow_the_formula():
    x = torch.randn(8, 64) * torch.rand(8, 1)
    x[2, 16:32] = 0.0  # a zero block gets the fp8 "eps" 0.125
    gs = torch.tensor([1700.0])
    _, block_scale = nvfp4.quantize(x, gs)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (8, 4)
    expected = (gs * (x.reshape(8, 4, 16).abs().amax(-1) / 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn)
    expected = torch.where(expected.float() == 0, 0.125, expected.float()).to(torch.float8_e4m3fn)
    assert torch.equal(block_scale.view(torch.uint8), expected.view(torch.uint8))
    assert block_scale[2, 1].item() == 0.125


@pytest.mark.parametrize("rows,k", [(8, 64), (5, 160)])
def test_quantize_dequantize_matches_formats_reference(rows, k):
    w = torch.randn(rows, k) * torch.logspace(-2, 1, rows).unsqueeze(1)
    w[0, :16] = 0.0
    gs = nvfp4.global_scale_from_amax(w.abs().amax())
    packed, block_scale = nvfp4.quantize(w, gs)
    codes, s, w_hat = reference_fake_quant(w, gs.item())
    assert packed.shape == (rows, k // 2)
    assert torch.equal(nvfp4.unpack_e2m1(packed), codes)
    assert torch.equal(block_scale.float(), s)
    assert torch.equal(nvfp4.dequantize(packed, block_scale, gs), w_hat)
    assert torch.equal(nvfp4.quantize_dequantize(w, gs), w_hat)
    assert torch.equal(nvfp4.dequantize(packed, block_scale, gs, torch.bfloat16), w_hat.bfloat16())


def test_elements_are_divided_by_s_over_gs_as_compressed_tensors_does():
    # Values within a few ulps of a rounding threshold, where x / (s / gs) and x * gs / s round differently.
    thresholds = torch.tensor(BOUNDARIES)
    rows = []
    for amax in torch.linspace(0.5, 3.0, 16):
        gs = nvfp4.global_scale_from_amax(amax.reshape(1))
        d = torch.full_like(gs, 448.0) / gs  # the block max is the tensor max, so every block scale is 448
        candidates = [thresholds * d]
        for direction in (1e9, 0.0):
            nudged = thresholds * d
            for _ in range(4):
                nudged = torch.nextafter(nudged, torch.full_like(nudged, direction))
                candidates.append(nudged)
        x = torch.cat(candidates)
        disagree = x[nvfp4.cast_to_e2m1_codes(x / d) != nvfp4.cast_to_e2m1_codes(x * gs / 448.0)]
        for value in disagree.tolist():
            rows.append((amax.item(), gs, value))
    assert len(rows) >= 10
    x = torch.zeros(len(rows), 16)
    x[:, 0] = torch.tensor([amax for amax, _, _ in rows])
    x[:, 1] = torch.tensor([value for _, _, value in rows])
    gs = torch.cat([gs for _, gs, _ in rows]).reshape(-1, 1)
    packed, block_scale = nvfp4.quantize(x, gs)
    assert torch.all(block_scale.float() == 448.0)
    d = torch.full_like(gs, 448.0) / gs  # (python float / tensor would be reciprocal-then-multiply)
    assert torch.equal(nvfp4.unpack_e2m1(packed)[:, 1], reference_codes(x[:, 1:2] / d).flatten())


def test_activations_beyond_a_static_global_scale_saturate():
    calibrated_amax = torch.tensor(1.0)
    gs = nvfp4.global_scale_from_amax(calibrated_amax)
    x = torch.randn(4, 32).clamp(-1, 1)
    x[1, 3], x[2, 20] = 10.0, -25.0
    packed, block_scale = nvfp4.quantize(x, gs)
    assert block_scale[1, 0].item() == 448.0 and block_scale[2, 1].item() == 448.0
    codes = nvfp4.unpack_e2m1(packed)
    assert codes[1, 3].item() == 7 and codes[2, 20].item() == 15
    x_hat = nvfp4.dequantize(packed, block_scale, gs)
    assert x_hat[1, 3].item() == pytest.approx(6 * 448 / gs.item()) and x_hat[2, 20].item() == -x_hat[1, 3].item()
    assert torch.equal(codes, reference_fake_quant(x, gs.item())[0])


def test_per_row_global_scales_equal_row_by_row_quantization():
    x = torch.randn(6, 48) * torch.logspace(-3, 2, 6).unsqueeze(1)
    gs = nvfp4.global_scale_from_amax(x.abs().amax(dim=1, keepdim=True))
    packed, block_scale = nvfp4.quantize(x, gs)
    for r in range(6):
        row_packed, row_scale = nvfp4.quantize(x[r:r + 1], gs[r])
        assert torch.equal(packed[r:r + 1], row_packed)
        assert torch.equal(block_scale[r:r + 1].view(torch.uint8), row_scale.view(torch.uint8))
    x_hat = nvfp4.dequantize(packed, block_scale, gs)
    assert torch.equal(x_hat[4], nvfp4.dequantize(packed[4:5], block_scale[4:5], gs[4])[0])
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4.quantize(x, torch.ones(4, 1))


def test_statistics_dtype_rounds_block_amax_over_6_first():
    torch.manual_seed(0)
    x = (torch.randn(64, 256) * 0.02).bfloat16()
    gs = nvfp4.global_scale_from_amax(x.abs().amax()).reshape(1)  # [1]: a 0-d float32 would not promote bf16
    _, in_bf16 = nvfp4.quantize(x, gs, statistics_dtype=torch.bfloat16)
    _, in_fp32 = nvfp4.quantize(x, gs)
    block_amax = x.reshape(64, 16, 16).abs().amax(-1)
    expected_bf16 = (gs * (block_amax / 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn)
    expected_fp32 = (gs * (block_amax.float() / 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn)
    assert torch.equal(in_bf16.view(torch.uint8), expected_bf16.view(torch.uint8))
    assert torch.equal(in_fp32.view(torch.uint8), expected_fp32.view(torch.uint8))
    assert not torch.equal(in_bf16.view(torch.uint8), in_fp32.view(torch.uint8))


def test_k_not_multiple_of_16_raises():
    with pytest.raises(ValueError, match="K=24"):
        nvfp4.quantize(torch.randn(2, 24), torch.tensor([1.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_unscaled_is_exact_for_every_code_and_scale(dtype):
    scale_bytes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    finite = scale_bytes.view(torch.float8_e4m3fn).float().isfinite()
    block_scale = scale_bytes[finite].view(torch.float8_e4m3fn).reshape(-1, 1)
    assert block_scale.shape[0] == 254
    codes = torch.arange(16, dtype=torch.uint8).repeat(254, 1)
    out = nvfp4.dequantize_unscaled(nvfp4.pack_e2m1(codes), block_scale, dtype)
    assert out.dtype == dtype
    exact = nvfp4.E2M1_VALUES.repeat(254, 1) * block_scale.float()
    assert torch.equal(out.float(), exact)


def test_dequantize_unscaled_times_inverse_global_scale_is_dequantize():
    w = torch.randn(4, 32)
    gs = nvfp4.global_scale_from_amax(w.abs().amax())
    packed, block_scale = nvfp4.quantize(w, gs)
    unscaled = nvfp4.dequantize_unscaled(packed, block_scale, torch.float32)
    torch.testing.assert_close(unscaled / gs, nvfp4.dequantize(packed, block_scale, gs), rtol=2**-23, atol=0)


def test_swizzled_block_scale_layout():
    rows, cols = 130, 6
    block_scale = torch.randint(1, 127, (rows, cols), dtype=torch.uint8).view(torch.float8_e4m3fn)
    swizzled = nvfp4.swizzle_block_scale(block_scale)
    padded_cols = 8
    assert swizzled.dtype == torch.float8_e4m3fn and swizzled.shape == (256 * padded_cols,)
    expected = torch.zeros(256 * padded_cols, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            offset = 512 * ((r // 128) * (padded_cols // 4) + c // 4) + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
            expected[offset] = block_scale.view(torch.uint8)[r, c]
    assert torch.equal(swizzled.view(torch.uint8), expected)
