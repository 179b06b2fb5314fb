"""NVFP4 with compressed-tensors semantics: E2M1 elements, one E4M3 scale per 16 elements, a float32 global scale.

Encoding (compressed-tensors `generate_gparam`, `calculate_qparams`, `_quantize`; formats.md 1.3-1.4):
    gs = 448 * 6 / amax(tensor)                                   stored; the divisor at dequant time
    s  = fp8_e4m3(clamp(gs * (amax(block) / 6), max=448))         stored; exact zeros become 0.125
    q  = E2M1_RNE(clamp(x / (s / gs), -6, 6))                     stored, two codes per byte
    x_hat = e2m1(q) * (s / gs)
Every rounding step follows compressed-tensors, so its checkpoints are reproduced byte for byte: `x / (s / gs)`
(`x * gs / s` differs in the last bit), and gs as torch evaluates its `2688.0 / amax`, i.e. `reciprocal(amax) * 2688`.
vLLM's activation quantizer (`ref_nvfp4_quant`, mirroring its CUDA kernel) rounds differently: `gs * (amax * (1/6))`,
`x * (1 / (s * (1/gs)))` and zero block scales kept at 0. On random bf16 activations about 3e-4 of its block scales
and codes differ from ours, all from values within an ulp of a rounding boundary.
"""
from __future__ import annotations

import functools

import torch

from mixquant.quantization.fp8 import FP8_DTYPE, FP8_MAX

FP4_MAX = 6.0
BLOCK_SIZE = 16

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Index = code nibble (sign << 3 | magnitude index); code 8 is -0.
E2M1_VALUES = torch.tensor(_E2M1_MAGNITUDES + tuple(-m for m in _E2M1_MAGNITUDES), dtype=torch.float32)

# compressed-tensors replaces a zero block scale by its fp8 "eps", so dequantization never divides by 0.
_ZERO_BLOCK_SCALE = 0.125

# Midpoint between magnitude i and i + 1, and whether a value exactly there rounds up: ties go to the even index
# (the E2M1 value whose mantissa bit is 0).
_ROUNDING_BOUNDARIES = tuple(
    ((low + high) / 2, (i + 1) % 2 == 0)
    for i, (low, high) in enumerate(zip(_E2M1_MAGNITUDES, _E2M1_MAGNITUDES[1:]))
)


def cast_to_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8, 0..15): saturate at +-6, round half to even.

    The sign bit is set for x < 0, so a negative value that rounds to zero gives code 8 (-0) and -0.0 itself gives
    code 0, as compressed-tensors' `cast_to_fp4` + `pack_fp4_to_uint8` do. Both decode to 0.
    """
    magnitude = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for boundary, tie_rounds_up in _ROUNDING_BOUNDARIES:
        index += (magnitude >= boundary) if tie_rounds_up else (magnitude > boundary)
    return index | ((x < 0).to(torch.uint8) << 3)


@functools.cache
def _code_table(device: torch.device) -> torch.Tensor:
    """E2M1_VALUES on `device`, copied once: no host-to-device copy per call (CUDA graphs capture none)."""
    return E2M1_VALUES.to(device)


def e2m1_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) -> float32 values."""
    return _code_table(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] -> bytes [..., K/2]; element 2j goes to the low nibble of byte j, element 2j+1 to the high one.

    Same order as compressed-tensors' `pack_fp4_to_uint8`, vLLM's `break_fp4_bytes` and torch.float4_e2m1fn_x2.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"E2M1 packing needs an even last dim, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] -> codes [..., K]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """gs = 448 * 6 / amax, elementwise, returned as float32 (compressed-tensors' `generate_gparam`).

    Bit for bit as compressed-tensors gets it: its `2688.0 / amax` is torch's `reciprocal(amax) * 2688` (one ulp off
    a true division at times), and it runs in amax's dtype before the float32 cast. llm-compressor hands it the bf16
    amax of a bf16 weight, so pass amax in the weight's dtype to reproduce its checkpoints. amax is clamped to the
    dtype's smallest normal; a non-finite result (amax 0 or NaN) becomes 1.0.
    """
    safe_amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    gs = safe_amax.reciprocal() * (FP8_MAX * FP4_MAX)
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32)


def quantize(x: torch.Tensor, global_scale: torch.Tensor, *,
             statistics_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (packed uint8 [R, K/2], block_scale float8_e4m3fn [R, K/16]).

    global_scale is float32, per tensor ([1] or scalar) or per row ([R, 1]: dynamic per-token activations, fused
    weights whose shards keep their own global scale). Values beyond what a static global scale was calibrated for
    saturate: block scales at 448, scaled elements at +-6.

    statistics_dtype is where the block statistic amax / 6 is rounded before it meets the float32 global scale.
    float32 is right for activations (vLLM's and Blackwell's quantizers work in float32); llm-compressor computes it
    in the weight's dtype, so its bf16 checkpoints are reproduced only with statistics_dtype=torch.bfloat16.
    """
    rows, k = x.shape
    if k % BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs K divisible by {BLOCK_SIZE}, got K={k}")
    gs = _row_global_scale(global_scale, rows, x.device)
    blocks = x.unflatten(-1, (k // BLOCK_SIZE, BLOCK_SIZE))
    block_amax = blocks.abs().amax(dim=-1).to(statistics_dtype)
    scale = (gs * (block_amax / FP4_MAX)).float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    scale = torch.where(scale == 0, _ZERO_BLOCK_SCALE, scale)
    dequant_scale = scale / gs
    codes = cast_to_e2m1_codes((blocks.float() / dequant_scale.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    return pack_e2m1(codes.flatten(-2)), scale.to(FP8_DTYPE)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [R, K/2], block_scale [R, K/16], global_scale) -> e2m1 * (s / gs) as [R, K] in dtype.

    Same association as compressed-tensors' `_dequantize`, so its decompression is matched bit for bit.
    """
    gs = _row_global_scale(global_scale, packed.shape[0], packed.device)
    dequant_scale = block_scale.float() / gs
    return _apply_block_scale(packed, dequant_scale).to(dtype)


def dequantize_unscaled(packed: torch.Tensor, block_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e2m1 * s, without the global scale: exact in bf16 and fp16 (formats.md 6 Q2).

    An emulated NVFP4 GEMM multiplies by alpha = 1 / (gs_x * gs_w) in float32 afterwards, where Blackwell's FP4 GEMM
    applies it.
    """
    return _apply_block_scale(packed, block_scale.float()).to(dtype)


def quantize_dequantize(x: torch.Tensor, global_scale: torch.Tensor, *,
                        statistics_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fake-quantize x [R, K] through NVFP4; float32 result."""
    packed, block_scale = quantize(x, global_scale, statistics_dtype=statistics_dtype)
    return dequantize(packed, block_scale, global_scale)


def swizzle_block_scale(block_scale: torch.Tensor) -> torch.Tensor:
    """Block scales [R, C] -> the 1-D 128x4-tiled layout cuBLAS' FP4 GEMM reads (formats.md 3.1, `to_blocked`).

    Zero-padded to [round_up(R, 128), round_up(C, 4)]; element (r, c) lands at
    512 * ((r // 128) * (Cp / 4) + c // 4) + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4.
    """
    rows, cols = block_scale.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros(padded_rows, padded_cols, dtype=torch.uint8, device=block_scale.device)
    padded[:rows, :cols] = block_scale.view(torch.uint8)
    tiles = padded.view(padded_rows // 128, 4, 32, padded_cols // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(-1).view(block_scale.dtype)


def _row_global_scale(global_scale: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """A per-tensor or per-row global scale as float32 [1, 1] or [rows, 1]."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=device).reshape(-1, 1)
    if gs.shape[0] not in (1, rows):
        raise ValueError(f"global_scale must have 1 or {rows} elements, got {gs.shape[0]}")
    return gs


def _apply_block_scale(packed: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    values = e2m1_codes_to_float(unpack_e2m1(packed))
    blocks = values.unflatten(-1, (block_scale.shape[-1], BLOCK_SIZE))
    return (blocks * block_scale.unsqueeze(-1)).flatten(-2)
