"""Causal prefill attention with FP8 (E4M3) tensor-core operands, flash-attention style, in Triton.

For one sequence's fresh tokens (nothing cached before them): q [tokens, q_heads, D], k and v [tokens, kv_heads,
D], bf16 in and out. At 32k-128k tokens BF16 attention costs about as much as all the linear layers together, so
FP8 linear layers alone cannot speed up long prefills; this runs both attention products at the FP8 rate.

Quantization, one float32 scale (amax / 448) per (head, tile of rows), the tile being the kernel's own tile
along the sequence, so that every tensor-core product has one scalar scale per operand:
- K and V: `quantize_blocks_fp8` writes them once, heads first, in the layouts Hopper's FP8 wgmma reads
  (both operands K-major: K as [tokens, D] rows, V transposed to [D, tokens]), zero-padded to whole tiles;
- Q: each program quantizes its own [BLOCK_M, D] tile in registers (a Q tile belongs to one program only).
Inside the kernel, S = (q8 k8^T) * q_scale * k_scale * softmax_scale in float32; an online softmax keeps the
running max and sum in float32; P is quantized per (row, tile): each row's largest entry of the tile maps to 448
(P's values in [0, 1] relative to that maximum use E4M3's whole range), and the row's factor to the running max
is applied with V's scale to the float32 product. Errors, and why per tile rather than one fixed scale: NOTES.md.

`fp8_attention_reference` computes the same quantization and the same tile order in PyTorch (tests compare the
kernel with it tightly, and both with float64 attention more loosely).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixquant.kernels.quant import _quantize, _row_scale
from mixquant.quantization.fp8 import _ZERO_ROW_SCALE, FP8_DTYPE, FP8_MAX

_LOG2E = 1.4426950408889634
# exp2(s - (m - LOG2_FP8_MAX)) is P * 448 at the cost of a plain exp2(s - m): the row's tile max lands on 448
_LOG2_FP8_MAX = math.log2(FP8_MAX)
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape; the defaults suit head_dim 128 on Hopper (two warpgroups of 64 query rows each)."""

    block_m: int = 128  # query rows per program, and the quantization block of Q
    block_n: int = 64  # key rows per tile, and the quantization block of K and V
    num_warps: int = 8
    num_stages: int = 3


# ---- per-block quantization of K and V ---------------------------------------------------------------------


@triton.jit
def _quantize_blocks_kernel(x_ptr, out_ptr, scale_ptr, T, num_blocks,
                            stride_xt, stride_xh, stride_oh, stride_ot, stride_od,
                            BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                            FP8_MAX: tl.constexpr, ZERO_ROW_SCALE: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    # rows past T read as 0: the padding of the last tile quantizes to 0 (finite: it meets P = 0 there);
    # int64 row offsets: T * stride_xt passes 2**31 past ~350k tokens of a fused qkv row
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + head * stride_xh + dims[None, :],
                mask=rows[:, None] < T, other=0.0).to(tl.float32)
    scale = _row_scale(tl.max(tl.abs(x)), FP8_MAX, ZERO_ROW_SCALE)
    out = out_ptr + head.to(tl.int64) * stride_oh + rows[:, None] * stride_ot + dims[None, :] * stride_od
    tl.store(out, _quantize(x, scale, FP8_MAX))  # the strides pick [T, D] rows or the transposed [D, T]
    tl.store(scale_ptr + head * num_blocks + block, scale)


def quantize_blocks_fp8(x: torch.Tensor, block: int, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> (x8, scale): one scale per (head, `block` rows), float8_e4m3fn values zero-padded to whole blocks.

    x8 is [H, T_pad, D], or [H, D, T_pad] with `transpose`; scale [H, T_pad // block] float32. The arithmetic is
    quantize_rowwise's on CUDA (amax * float32(1/448), IEEE division, RNE cast) over the block instead of a row.
    """
    tokens, heads, head_dim = x.shape
    num_blocks = triton.cdiv(tokens, block)
    shape = (heads, head_dim, num_blocks * block) if transpose else (heads, num_blocks * block, head_dim)
    x8 = torch.empty(shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((heads, num_blocks), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return x8, scale
    if x.stride(-1) != 1:
        x = x.contiguous()
    stride_ot, stride_od = (1, x8.stride(1)) if transpose else (x8.stride(1), 1)
    _quantize_blocks_kernel[(num_blocks, heads)](
        x, x8, scale, tokens, num_blocks, x.stride(0), x.stride(1), x8.stride(0), stride_ot, stride_od,
        BLOCK=block, HEAD_DIM=head_dim, FP8_MAX=FP8_MAX, ZERO_ROW_SCALE=_ZERO_ROW_SCALE,
        num_warps=8 if block * head_dim >= 8192 else 4)
    return x8, scale


# ---- attention ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(acc0, acc1, l_i, m_i, q8, qk_scale, k8_ptr, vt8_ptr, k_scale_ptr, v_scale_ptr, start_n, offs_m,
                 stride_kt, stride_vt, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                 LOG2_FP8_MAX: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the online softmax; MASK only on tiles that cross the diagonal."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, HALF)
    tile = start_n // BLOCK_N
    # K^T [D, BLOCK_N] and V [BLOCK_N, D] are both read with the reduction dim contiguous: FP8 wgmma takes only
    # K-major operands from shared memory
    kt = tl.load(k8_ptr + offs_n[None, :] * stride_kt + offs_d[:, None])
    # fp8 products are exact in fp32; both scales go on the fp32 result (scalars: one per tile)
    s = tl.dot(q8, kt) * (qk_scale * tl.load(k_scale_ptr + tile))
    if MASK:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_tile = tl.max(s, 1)
    m_new = tl.maximum(m_i, m_tile)  # finite: every row sees key 0 in its first tile
    if MASK:
        m_tile = tl.where(m_tile == float("-inf"), m_new, m_tile)  # a row with no key here: p = 0, not NaN
    alpha = tl.exp2(m_i - m_new)  # rescales what came before to the new running max
    beta = tl.exp2(m_tile - m_new)  # this tile's weight relative to the running max
    # P relative to the row's own max in this tile, times 448: [0, 448] uses E4M3's whole range whatever beta is
    p = tl.exp2(s - (m_tile - LOG2_FP8_MAX)[:, None])
    l_i = l_i * alpha + beta * tl.sum(p, 1)
    p8 = p.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    row_scale = beta * tl.load(v_scale_ptr + tile)
    # Each PV product is a fresh fp32 tile added on the CUDA cores, so the sum over thousands of tiles never runs
    # in the tensor core's reduced-precision FP8 accumulator; two half-width products hold 32 fewer registers
    # than one (no spills at 128 x 128 tiles, tests/kernels/test_hopper_build.py).
    v0 = tl.load(vt8_ptr + offs_n[:, None] + offs_h[None, :] * stride_vt)
    acc0 = acc0 * alpha[:, None] + tl.dot(p8, v0) * row_scale[:, None]
    v1 = tl.load(vt8_ptr + offs_n[:, None] + (HALF + offs_h[None, :]) * stride_vt)
    acc1 = acc1 * alpha[:, None] + tl.dot(p8, v1) * row_scale[:, None]
    return acc0, acc1, l_i, m_new


@triton.jit
def _fp8_prefill_kernel(q_ptr, k8_ptr, vt8_ptr, k_scale_ptr, v_scale_ptr, out_ptr, sm_scale_log2, T, num_kv_blocks,
                        stride_qt, stride_qh, stride_kh, stride_kt, stride_vh, stride_vt, stride_ot, stride_oh,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        FP8_MAX: tl.constexpr, ZERO_ROW_SCALE: tl.constexpr, LOG2_FP8_MAX: tl.constexpr):
    head = tl.program_id(0)  # heads of one KV group run side by side and share its K/V tiles through L2
    # the last query tiles have the most keys: launch them first so the short ones fill the tail
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = head // GROUP
    start_m = m_block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < T
    rows = offs_m[:, None].to(tl.int64)  # T * stride_qt passes 2**31 past ~350k tokens of a fused qkv row

    # this program's Q tile is its quantization block: amax, scale and the fp8 cast happen in registers
    q = tl.load(q_ptr + rows * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_valid[:, None], other=0.0).to(tl.float32)
    q_scale = _row_scale(tl.max(tl.abs(q)), FP8_MAX, ZERO_ROW_SCALE)
    q8 = _quantize(q, q_scale, FP8_MAX)
    qk_scale = q_scale * sm_scale_log2  # softmax in log2 units

    k8_ptr += kv_head.to(tl.int64) * stride_kh
    vt8_ptr += kv_head.to(tl.int64) * stride_vh
    k_scale_ptr += kv_head * num_kv_blocks
    v_scale_ptr += kv_head * num_kv_blocks
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)  # output dims [0, D/2)
    acc1 = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)  # output dims [D/2, D)
    # Tiles whose every key precedes the tile's first query need no mask; tiles past its last query (or past T)
    # are skipped. Pad rows past T compute on zeros and are never stored.
    unmasked_end = (start_m + 1) // BLOCK_N * BLOCK_N
    end = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc0, acc1, l_i, m_i = _attend_tile(acc0, acc1, l_i, m_i, q8, qk_scale, k8_ptr, vt8_ptr, k_scale_ptr,
                                            v_scale_ptr, start_n, offs_m, stride_kt, stride_vt, HEAD_DIM, BLOCK_N,
                                            False, LOG2_FP8_MAX)
    for start_n in range(unmasked_end, end, BLOCK_N):
        acc0, acc1, l_i, m_i = _attend_tile(acc0, acc1, l_i, m_i, q8, qk_scale, k8_ptr, vt8_ptr, k_scale_ptr,
                                            v_scale_ptr, start_n, offs_m, stride_kt, stride_vt, HEAD_DIM, BLOCK_N,
                                            True, LOG2_FP8_MAX)

    offs_h = tl.arange(0, HEAD_DIM // 2)
    out = out_ptr + rows * stride_ot + head * stride_oh + offs_h[None, :]
    tl.store(out, (acc0 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    tl.store(out + HEAD_DIM // 2, (acc1 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def check_prefill_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """What both FP8 prefill attentions take: q [T, q_heads, D], k and v [T, kv_heads, D], kv_heads dividing
    q_heads, D in HEAD_DIMS, one 16-bit dtype."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [{tokens}, kv_heads, {head_dim}]")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into {kv_heads} KV head groups")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; use one of {HEAD_DIMS}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"q, k and v must share a 16-bit float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def fp8_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          out: torch.Tensor | None = None, *, config: PrefillConfig = PrefillConfig()) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v of one sequence's fresh tokens with FP8 operands; returns out [T, q_heads, D].

    q [T, q_heads, D], k and v [T, kv_heads, D], 16-bit, last dim contiguous (token and head strides free, e.g.
    views into a fused qkv row); query head h reads KV head h // (q_heads // kv_heads). D is 64 or 128. Query i
    attends to keys 0..i. `out`, if given (q's shape and dtype, last dim contiguous), receives the result.
    """
    check_prefill_inputs(q, k, v)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be shaped and typed like q, with a contiguous last dim")
    if tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    k8, k_scale = quantize_blocks_fp8(k, config.block_n)
    vt8, v_scale = quantize_blocks_fp8(v, config.block_n, transpose=True)
    grid = (q_heads, triton.cdiv(tokens, config.block_m))
    _fp8_prefill_kernel[grid](
        q, k8, vt8, k_scale, v_scale, out, scale * _LOG2E, tokens, k_scale.shape[1],
        q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), vt8.stride(0), vt8.stride(1),
        out.stride(0), out.stride(1),
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        FP8_MAX=FP8_MAX, ZERO_ROW_SCALE=_ZERO_ROW_SCALE, LOG2_FP8_MAX=_LOG2_FP8_MAX,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


# ---- the same arithmetic in PyTorch ------------------------------------------------------------------------


def quantize_blocks_reference(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blocks_fp8 in PyTorch: (x8 [H, T_pad, D] float8_e4m3fn, scale [H, T_pad // block] float32)."""
    tokens, heads, head_dim = x.shape
    num_blocks = -(-tokens // block)
    xf = torch.zeros(heads, num_blocks * block, head_dim, dtype=torch.float32, device=x.device)
    xf[:, :tokens] = x.float().transpose(0, 1)
    tiles = xf.view(heads, num_blocks, block * head_dim)
    # amax * float32(1/448): the kernel's (and CUDA torch's) rounding of amax / 448
    scale = tiles.abs().amax(-1) * torch.tensor(1 / FP8_MAX, dtype=torch.float32, device=x.device)
    scale = torch.where(scale == 0, _ZERO_ROW_SCALE, scale)
    x8 = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8.view(heads, num_blocks * block, head_dim), scale


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            config: PrefillConfig = PrefillConfig()) -> torch.Tensor:
    """What fp8_prefill_attention computes, in float32 PyTorch, with its quantization and its tile order.

    All query tiles advance together over the key tiles; a tile a query tile skips (above the diagonal) is fully
    masked here, which leaves the running max, sum and accumulator exactly as they were.
    """
    tokens, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    bm, bn = config.block_m, config.block_n
    q8, q_scale = quantize_blocks_reference(q, bm)
    k8, k_scale = quantize_blocks_reference(k, bn)
    v8, v_scale = quantize_blocks_reference(v, bn)
    q8 = q8.float()[:, :tokens]
    k8, v8 = k8.float().repeat_interleave(group, 0), v8.float().repeat_interleave(group, 0)
    k_scale, v_scale = k_scale.repeat_interleave(group, 0), v_scale.repeat_interleave(group, 0)
    pos = torch.arange(tokens, device=q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    qk_scale = (q_scale * torch.tensor(scale * _LOG2E, **f32)).repeat_interleave(bm, 1)[:, :tokens]
    log2_max = torch.tensor(_LOG2_FP8_MAX, **f32)
    m_i = torch.full((q_heads, tokens), float("-inf"), **f32)
    l_i = torch.zeros(q_heads, tokens, **f32)
    acc = torch.zeros(q_heads, tokens, head_dim, **f32)
    for tile in range(k_scale.shape[1]):
        keys = slice(tile * bn, (tile + 1) * bn)
        s = (q8 @ k8[:, keys].transpose(1, 2)) * (qk_scale * k_scale[:, tile:tile + 1])[..., None]
        key_pos = torch.arange(keys.start, keys.stop, device=q.device)
        s = torch.where(pos[:, None] >= key_pos[None, :], s, float("-inf"))
        m_tile = s.amax(-1)
        m_new = torch.maximum(m_i, m_tile)
        m_tile = torch.where(m_tile == float("-inf"), m_new, m_tile)
        alpha, beta = torch.exp2(m_i - m_new), torch.exp2(m_tile - m_new)
        p = torch.exp2(s - (m_tile - log2_max)[..., None])
        l_i = l_i * alpha + beta * p.sum(-1)
        pv = p.to(FP8_DTYPE).float() @ v8[:, keys]
        acc = acc * alpha[..., None] + pv * (beta * v_scale[:, tile:tile + 1])[..., None]
        m_i = m_new
    return (acc / l_i[..., None]).transpose(0, 1).to(q.dtype)
