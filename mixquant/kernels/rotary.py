"""Per-head RMSNorm (Qwen3's QK-norm) and rotary embedding of q or k in one Triton pass.

Reads x once (a strided view into the fused qkv output is fine), writes the rotated heads once, and gathers each
token's cos/sin row itself. The rounding follows the eager ops in `mixquant.layers.rotary_embedding` step by step:
the norm in float32, rounded to x's dtype before and after the weight; the table rows rounded to x's dtype; each
product and the sum rounded to it, as PyTorch rounds every 16-bit op. FP fusion is off for it: otherwise the
compiler turns a rounded product and the sum after it into one bf16 FMA (fma.rn.bf16x2, one rounding instead of
two), which on an H200 left a quarter of the outputs a step or two from eager's. torch.compile fused the same chain at
570-600 GB/s on an H200 (docs/benchmarks.md), a seventh of the copy rate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_kernel(x_ptr, weight_ptr, out_ptr, cos_ptr, sin_ptr, positions_ptr, eps,
                      stride_xt, stride_xh, stride_ot, stride_oh, stride_table,
                      HEADS: tl.constexpr, HEADS_POW2: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_POW2)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < HEADS
    # rotate-half layout: dims [0, HALF) pair with [HALF, 2 * HALF), so the two halves load as two tiles
    x_lo_ptr = x_ptr + token * stride_xt + heads * stride_xh + dims
    lo = tl.load(x_lo_ptr, mask=mask, other=0.0)
    hi = tl.load(x_lo_ptr + HALF, mask=mask, other=0.0)
    dtype = lo.dtype
    lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    if NORM:
        mean_square = (tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / (2 * HALF)
        inv_rms = tl.math.rsqrt(mean_square + eps)[:, None]
        w_lo = tl.load(weight_ptr + dims).to(tl.float32)
        w_hi = tl.load(weight_ptr + HALF + dims).to(tl.float32)
        lo = (w_lo * (lo * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        hi = (w_hi * (hi * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    row = tl.load(positions_ptr + token).to(tl.int64) * stride_table
    cos_lo = tl.load(cos_ptr + row + dims).to(dtype).to(tl.float32)
    cos_hi = tl.load(cos_ptr + row + HALF + dims).to(dtype).to(tl.float32)
    sin_lo = tl.load(sin_ptr + row + dims).to(dtype).to(tl.float32)
    sin_hi = tl.load(sin_ptr + row + HALF + dims).to(dtype).to(tl.float32)
    out_lo = (lo * cos_lo).to(dtype).to(tl.float32) + (-hi * sin_lo).to(dtype).to(tl.float32)
    out_hi = (hi * cos_hi).to(dtype).to(tl.float32) + (lo * sin_hi).to(dtype).to(tl.float32)
    out_lo_ptr = out_ptr + token * stride_ot + heads * stride_oh + dims
    tl.store(out_lo_ptr, out_lo.to(dtype), mask=mask)
    tl.store(out_lo_ptr + HALF, out_hi.to(dtype), mask=mask)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos_table: torch.Tensor,
              sin_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (16-bit, last dim contiguous) -> rotate_half(rms_norm(x) * weight) at `positions`.

    weight None: rotation only (models without QK-norm). Tables [max_position, D] float32, as RotaryEmbedding
    keeps them. Returns a new contiguous [T, heads, D] tensor.
    """
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or x.stride(-1) != 1:
        raise ValueError(f"expected [T, heads, D] with an even, contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if cos_table.shape[-1] != head_dim or cos_table.stride() != sin_table.stride() or cos_table.stride(-1) != 1:
        raise ValueError(f"cos/sin tables must be [max_position, {head_dim}] with the same contiguous layout")
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    _norm_rope_kernel[(tokens,)](
        x, x if weight is None else weight, out, cos_table, sin_table, positions, eps,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos_table.stride(0),
        HEADS=heads, HEADS_POW2=triton.next_power_of_2(heads), HALF=head_dim // 2, NORM=weight is not None,
        num_warps=4, enable_fp_fusion=False)
    return out
