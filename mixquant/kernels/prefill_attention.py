"""Prefill attention of one sequence's segment over its paged KV cache, flash-attention style, in Triton.

The GPU path for what PyTorch's SDPA cannot do well: sliding windows (SDPA has no window argument, and a dense
[n, n] mask at 32k tokens is 1 GiB per layer) and heads wider than its fused kernels take (Gemma 4's head_dim 512,
where SDPA would fall back to its math kernel without a word). The segment's rows are at positions
[context_start, context_start + n); its K/V, already written to the cache, and everything cached before it are read
through the block table, so a fresh prompt, a chunk after a cached prefix and a window are one code path.

Each program takes BLOCK_M query rows of one head, walks the keys those rows can see (from the first row's window
start, or 0, to the last row) in tiles of BLOCK_N, and keeps an online softmax in float32. Correct under the Triton
interpreter (tests/kernels/test_prefill_attention.py) and compiled for sm_90 without spills
(tests/kernels/test_hopper_build.py); its speed on a GPU has not been measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PagedPrefillConfig:
    block_m: int = 64  # query rows per program
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> PagedPrefillConfig:
        """Smaller tiles for wider heads, so that Q, the float32 accumulator and two stages of K/V tiles fit
        (chosen by compiling for sm_90, not by timing)."""
        if head_dim <= 128:
            return cls()
        return cls(block_n=32, num_warps=8) if head_dim <= 256 else cls(block_m=32, block_n=32, num_warps=8)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, out_ptr,
    qk_scale, num_rows, context_start, window, first_block,
    stride_qt, stride_qh,
    stride_cache_block, stride_cache_pos, stride_cache_head,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)  # heads of one KV group run side by side and share its K/V tiles through L2
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)  # the rows with the most keys first
    kv_head = head // GROUP
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < num_rows
    q_pos = context_start + offs_m
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(q_ptr + rows * stride_qt + head * stride_qh + offs_d[None, :], mask=row_valid[:, None], other=0.0)

    first_q = context_start + m_block * BLOCK_M
    end = tl.minimum(first_q + BLOCK_M, context_start + num_rows)  # one past the block's last query
    start = tl.where(window > 0, tl.maximum(first_q - window + 1, 0), 0)
    head_offset = kv_head * stride_cache_head
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < end
        # positions outside [start, end) are never loaded: table entries past them may hold anything
        block = tl.load(table_ptr + pos // BLOCK_SIZE - first_block, mask=valid, other=0).to(tl.int64)
        offsets = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_pos + head_offset
        k = tl.load(k_cache_ptr + offsets[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        distance = q_pos[:, None] - pos[None, :]
        visible = valid[None, :] & (distance >= 0) & ((window == 0) | (distance < window))
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # a row that has seen no key yet (its window starts in a later tile) keeps zero weight, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offsets[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = out_ptr + rows * stride_ot + head * stride_oh + offs_d[None, :]
    l_i = tl.where(row_valid, l_i, 1.0)  # pad rows past the segment saw nothing; they are not stored
    tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            context_start: int, scale: float, window: int | None = None, first_block: int = 0,
                            out: torch.Tensor | None = None, *,
                            config: PagedPrefillConfig | None = None) -> torch.Tensor:
    """Causal (or sliding-window) softmax(q k^T * scale) v of a segment of n query rows; returns out [n, heads, D].

    q [n, heads, D] at positions [context_start, context_start + n), last dim contiguous; k_cache, v_cache
    [num_blocks, block_size, kv_heads, D] with equal strides (views into a larger pool are fine), holding positions
    [0, context_start + n) of the sequence through `block_table` [blocks] (int32/int64), whose entry 0 is block
    `first_block` (a window's table starts at its first block). Query head h reads KV head h // (heads //
    kv_heads). With a `window`, the row at position p sees keys p - window + 1 .. p. D a power of two >= 16.
    """
    tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV head groups")
    if head_dim & (head_dim - 1) or head_dim < 16 or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({block_size}) must be powers of two, head_dim >= 16")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides, and q and the caches a contiguous last dim")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions, got {window}")
    if block_table.dim() != 1 or block_table.stride(0) != 1:
        raise ValueError("block_table must be one contiguous row of block ids")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be shaped and typed like q, with a contiguous last dim")
    if tokens == 0:
        return out
    config = config or PagedPrefillConfig.for_head_dim(head_dim)
    _paged_prefill_kernel[(num_heads, triton.cdiv(tokens, config.block_m))](
        q, k_cache, v_cache, block_table, out,
        scale * _LOG2E, tokens, context_start, window or 0, first_block,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        # fp32 inputs get exact fp32 products (tf32 would cost ~3e-4 relative error); 16-bit inputs ignore this
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
