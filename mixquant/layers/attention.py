"""Paged attention behind a small backend interface.

Every step first writes the new rows' K/V into the paged cache, then attends: a segment of rows attends to
its sequence's cache up to its own position, so a prefill chunk, a decode token and a mix of both are one code
path. Decode-only steps take a vectorised path of fixed shapes that CUDA graphs can capture.

A sliding-window layer (window W) lets query position p see keys p - W + 1 .. p only. Its block tables start at the
first block a row's window reaches (`first_window_block`), so blocks before it may be gone (engine/kv_cache.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from mixquant.utils.context import AttentionSegment, ForwardContext, get_context

# The largest head_dim PyTorch's fused SDPA kernels (flash, cuDNN) take on a GPU; beyond it SDPA would fall back to
# its O(n^2)-memory math kernel without a word, so larger heads (Gemma 4's 512) take the Triton kernels instead.
SDPA_MAX_HEAD_DIM = 256


def first_window_block(position: int, window: int | None, block_size: int) -> int:
    """The first cache block a query at `position` (or any later one) can see with this window."""
    return 0 if window is None else max(0, position - window + 1) // block_size


class TorchAttentionBackend:
    """Reference backend in plain PyTorch (SDPA); runs on CPU and GPU, with Triton kernels for decode rows and,
    on a GPU, for sliding windows and heads too large for SDPA's fused kernels."""

    def forward(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float,
                window: int | None = None) -> torch.Tensor:
        if ctx.decode_only:
            return self._decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, window)
        out = torch.empty_like(q)
        for seg in ctx.segments:
            # rows are laid out [prefill | decode]: only prefill segments may take an FP8 path, long enough ones
            fp8 = (seg.row_end <= ctx.num_prefill_rows
                   and seg.row_end - seg.row_start >= ctx.fp8_attention_min_tokens)
            attention = ctx.prefill_attention if fp8 else "bf16"
            out[seg.row_start:seg.row_end] = self._segment(q, k, v, k_cache, v_cache, seg, scale, attention, window)
        if ctx.context_lens is not None:  # the decode rows beside a prefill: one batched read of the paged cache
            tail = q.shape[0] - ctx.context_lens.shape[0]
            out[tail:] = self._decode(q[tail:], k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, window)
        return out

    @staticmethod
    def _segment(q, k, v, k_cache, v_cache, seg: AttentionSegment, scale: float,
                 attention: str = "bf16", window: int | None = None) -> torch.Tensor:
        rows = slice(seg.row_start, seg.row_end)
        n = seg.row_end - seg.row_start
        if attention != "bf16" and seg.context_start == 0 and q.is_cuda:
            return _fp8_prefill(attention)(q[rows], k[rows], v[rows], scale)
        if q.is_cuda and (window is not None or q.shape[-1] > SDPA_MAX_HEAD_DIM):
            from mixquant.kernels.prefill_attention import paged_prefill_attention

            return paged_prefill_attention(q[rows], k_cache, v_cache, seg.block_table, seg.context_start, scale,
                                           window, first_window_block(seg.context_start, window, k_cache.shape[1]))
        # 4-D [1, heads, n, dim] views: the layout SDPA's flash/cuDNN kernels take (3-D [heads, n, dim] inputs
        # fall back to the math kernel, 40x slower on an H100 at 4k tokens)
        q_seg = _heads_first(q[rows])
        if seg.context_start == 0 and window is None:
            # nothing cached before this segment: attend to its own fresh K/V (the fast causal kernel)
            out = F.scaled_dot_product_attention(q_seg, _heads_first(k[rows]), _heads_first(v[rows]),
                                                 is_causal=True, scale=scale, enable_gqa=True)
            return out[0].transpose(0, 1)
        total = seg.context_start + n
        if window is None:
            # causal, aligned to the end of the cached prefix: no mask tensor and no K/V repeated per query head (on
            # an H200, 1.07-1.40x the masked SDPA over repeated K/V; gpu_tests/profile_engine.py --cached-attention)
            k_ctx = _heads_first(_gather(k_cache, seg.block_table, total))
            v_ctx = _heads_first(_gather(v_cache, seg.block_table, total))
            mask = causal_lower_right(n, total)
        else:
            # the table starts at the window's first block; keys before it are masked like those outside the window
            first = first_window_block(seg.context_start, window, k_cache.shape[1]) * k_cache.shape[1]
            k_ctx = _heads_first(_gather(k_cache, seg.block_table, total - first))
            v_ctx = _heads_first(_gather(v_cache, seg.block_table, total - first))
            mask = _window_mask(torch.arange(seg.context_start, total, device=q.device)[:, None],
                                torch.arange(first, total, device=q.device)[None, :], window)
        out = F.scaled_dot_product_attention(q_seg, k_ctx, v_ctx, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    @staticmethod
    def _decode(q, k_cache, v_cache, block_tables, context_lens, scale, window=None) -> torch.Tensor:
        if q.is_cuda:
            # reads only each row's own context, in fixed-shape launches a CUDA graph can replay
            from mixquant.kernels.paged_attention import paged_decode_attention

            return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window=window)
        rows, max_blocks = block_tables.shape
        block_size = k_cache.shape[1]
        k_ctx = k_cache[block_tables].flatten(1, 2).transpose(1, 2)  # [rows, kv_heads, max_len, dim]
        v_ctx = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
        positions = torch.arange(max_blocks * block_size, device=q.device)[None, :]
        if window is None:
            mask = positions < context_lens[:, None]
        else:  # window-relative tables: entry 0 is the block holding the row's first visible key
            first = (context_lens[:, None] - window).clamp(min=0) // block_size * block_size
            mask = _window_mask(context_lens[:, None] - 1, first + positions, window)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k_ctx, v_ctx, attn_mask=mask[:, None, None, :],
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2)


def _window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Broadcast positions -> whether each key is visible to each query: 0 <= query - key < window."""
    distance = query_positions - key_positions
    return (distance >= 0) & (distance < window)


def _fp8_prefill(attention: str):
    """The FP8 causal attention of EngineConfig.prefill_attention: "fp8" our Triton kernel (per-tile scales, FP32
    sums of every PV tile), "fp8-cudnn" cuDNN's fused FP8 flash attention (per-tensor scales)."""
    if attention == "fp8-cudnn":
        from mixquant.kernels.cudnn_attention import cudnn_fp8_prefill_attention

        return cudnn_fp8_prefill_attention
    from mixquant.kernels.fp8_attention import fp8_prefill_attention

    return fp8_prefill_attention


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, dim] -> a [1, heads, tokens, dim] view (the dim stays contiguous, which is all SDPA needs)."""
    return x.unsqueeze(0).transpose(1, 2)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions the table's blocks hold, [length, kv_heads, dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


class Attention(nn.Module):
    backend = TorchAttentionBackend()

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None = None,
                 kv_heads: slice | None = None):
        """num_heads, num_kv_heads: this rank's; kv_heads: which of the model's KV heads they are (all of them
        without tensor parallelism). window: a sliding window of that many keys (the query's own included); None:
        full causal attention."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_heads = kv_heads or slice(0, num_kv_heads)
        self.window = window
        # set by the runner (engine/kv_cache.py): [units, block_size, kv_heads, head_dim] views into the KV pool,
        # and which cache group's slots and tables this layer uses
        self.k_cache = self.v_cache = torch.empty(0)
        self.kv_group = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context().for_kv_group(self.kv_group)
        block_size = self.k_cache.shape[1]
        unit, offset = ctx.slot_mapping // block_size, ctx.slot_mapping % block_size
        self.k_cache.index_put_((unit, offset), k)
        self.v_cache.index_put_((unit, offset), v)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, ctx, self.scale, self.window)
