"""Decode attention over the paged KV cache, flash-decoding style, in Triton.

One query token per batch row attends to its row's cached positions [0, context_lens[b]), or with a sliding window
of W keys to its last W of them, in which case its block table starts at the block holding the first of those
(layers/attention.py: window-relative tables). Each row's context is cut into `num_splits` even parts that run in
parallel (so batch 1 with 8 KV heads still fills an H100 on a long
context); a program handles one (row, KV head, split) with all the query heads of that KV group as the rows of
one tensor-core tile, keeps an online softmax in fp32 and writes a partial (output, log-sum-exp); a second small
kernel merges the parts. With one split the first kernel writes the output itself.

CUDA-graph safe: the grid depends only on the batch size, the KV head count and `num_splits` (from the block
table's width, never from context_lens values), scratch sizes likewise, and nothing syncs with the host. Each
program reads its row's length on the device and skips work past it, so cost follows each row's own length.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# The most parts a row is cut into: past this, the scratch traffic and merge cost grow while the chip is full anyway.
MAX_SPLITS = 64
# Aim for this many programs per SM so that the memory system always has loads in flight.
_PROGRAMS_PER_SM = 4
# An H100 SXM's SM count, used where there is no CUDA device (the Triton interpreter on CPU).
_DEFAULT_SM_COUNT = 132


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the split kernel; the defaults suit head_dim 128 in bf16 on Hopper."""

    block_n: int = 64  # cached positions per tile (a power of two >= 16: a tl.dot dimension)
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> DecodeConfig:
        """Tiles of about 32 KB of K per stage: larger heads take fewer positions a tile (Gemma 4's 256 and 512
        would not fit two stages of 64 in shared memory). Not tuned on a GPU for head_dim > 128."""
        return cls() if head_dim <= 128 else cls(block_n=32) if head_dim <= 256 else cls(block_n=16, num_warps=8)


@triton.jit
def _split_len(span, num_splits, BLOCK_N: tl.constexpr):
    """Positions per split of one row: an even share of the positions it attends to, rounded up to whole tiles."""
    return tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _window_start(context_len, window):
    """The first position a row attends to: 0, or with a sliding window (window > 0) its window's first."""
    return tl.where(window > 0, tl.maximum(context_len - window, 0), 0)


# Triton compiles a kernel again for every new combination of its int arguments' "== 1" and "% 16 == 0"; the split
# count and the table width follow the batch, so specializing on them would compile anew in the middle of serving
# (an eager decode tail beside a prefill meets widths the start-up graphs never saw), for no gain in these loads.
@triton.jit(do_not_specialize=["num_splits", "stride_table"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, num_splits, window,
    stride_qb, stride_qh,
    stride_cache_block, stride_cache_pos, stride_cache_head,
    stride_table,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + row)
    first = _window_start(context_len, window)
    table_base = first // BLOCK_SIZE  # the block the row's table starts at
    split_len = _split_len(context_len - first, num_splits, BLOCK_N)
    start = first + split * split_len
    if start >= context_len:  # a short row needs fewer splits; the merge knows how many were used
        return
    end = tl.minimum(start + split_len, context_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    head_valid = offs_g < GROUP  # tl.dot needs >= 16 rows: the pad rows compute on zeros and are never stored
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_valid[:, None], other=0.0)

    table_ptr = block_tables_ptr + row * stride_table
    head_offset = kv_head * stride_cache_head
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max, in log2 units
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        valid = pos < end
        # Positions past the row's length are never loaded: padded table entries and stale slots may hold anything
        block = tl.load(table_ptr + pos // BLOCK_SIZE - table_base, mask=valid, other=0).to(tl.int64)
        offsets = block * stride_cache_block + (pos % BLOCK_SIZE) * stride_cache_pos + head_offset
        k = tl.load(k_cache_ptr + offsets[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # every tile holds at least one valid position, so m_new is finite and no NaN comes out of -inf - -inf
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offsets[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    if DIRECT:
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None])
    else:
        part = (row * NUM_HEADS + heads) * num_splits + split  # scratch is [rows, heads, splits(, HEAD_DIM)]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_valid[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=head_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, context_lens_ptr, num_splits, window,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + row)
    span = context_len - _window_start(context_len, window)
    used = tl.cdiv(span, _split_len(span, num_splits, BLOCK_N))  # splits that wrote a part
    first = (row * NUM_HEADS + head) * num_splits
    offs_s = tl.arange(0, SPLITS_PAD)
    lse_max = tl.max(tl.load(part_lse_ptr + first + offs_s, mask=offs_s < used, other=float("-inf")), 0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    total = 0.0
    for s in range(used):
        weight = tl.exp2(tl.load(part_lse_ptr + first + s) - lse_max)
        acc += weight * tl.load(part_out_ptr + (first + s) * HEAD_DIM + offs_d)
        total += weight
    tl.store(out_ptr + row * stride_ob + head * stride_oh + offs_d, (acc / total).to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device,
                       block_n: int = DecodeConfig.block_n) -> int:
    """Splits per row so that batch * kv_heads * splits programs fill the chip; a function of shapes only."""
    wanted = math.ceil(_PROGRAMS_PER_SM * _sm_count(device) / (batch * num_kv_heads))
    return max(1, min(wanted, MAX_SPLITS, math.ceil(max_context / block_n)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, *,
                           window: int | None = None, num_splits: int | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query token per row over its paged cache; returns out [B, num_heads, D].

    q [B, num_heads, D]; k_cache, v_cache [num_blocks, block_size, num_kv_heads, D] with equal strides (views into
    a larger pool are fine); block_tables [B, max_blocks] int32/int64; context_lens [B] int, each in
    [1, max_blocks * block_size]. Query head h reads KV head h // (num_heads // num_kv_heads). With a `window`, a
    row attends to its last `window` positions only and its table starts at the block holding the first of them
    (position max(0, context_len - window)). `num_splits` defaults to `default_num_splits` of the table's width;
    `config` to DecodeConfig.for_head_dim; `out`, if given, receives the result.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV head groups")
    if head_dim & (head_dim - 1) or head_dim < 16 or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({block_size}) must be powers of two, head_dim >= 16")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides, and q and the caches a contiguous last dim")
    if block_tables.stride(-1) != 1 or context_lens.stride(0) != 1:
        raise ValueError("block_tables rows and context_lens must be contiguous")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be shaped and typed like q, with a contiguous last dim")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions, got {window}")
    if batch == 0:
        return out
    config = config or DecodeConfig.for_head_dim(head_dim)
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device,
                                        config.block_n)
    direct = num_splits == 1
    # Scratch comes from torch's allocator on every call: inside a graph capture that is the graph's own pool.
    part_out = None if direct else q.new_empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32)
    part_lse = None if direct else q.new_empty((batch, num_heads, num_splits), dtype=torch.float32)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * _LOG2E, num_splits, window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=config.block_n, DIRECT=direct,
        # fp32 inputs get exact fp32 products (tf32 would cost ~3e-4 relative error); 16-bit inputs ignore this
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not direct:
        _merge_kernel[(batch, num_heads)](
            out, part_out, part_lse, context_lens, num_splits, window or 0,
            out.stride(0), out.stride(1),
            # one padded width for every split count up to MAX_SPLITS: one compiled variant, not one per power of 2
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),
            BLOCK_N=config.block_n, num_warps=1 if head_dim <= 64 else 2,
        )
    return out
