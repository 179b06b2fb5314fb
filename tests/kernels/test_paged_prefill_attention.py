"""paged_prefill_attention against a float64 reference, under the Triton interpreter (conftest): fresh prompts,
segments after a cached prefix, sliding windows with window-relative tables, GQA, and head dims up to Gemma 4's 512."""
from __future__ import annotations

import pytest
import torch

from mixquant.kernels.prefill_attention import PagedPrefillConfig, paged_prefill_attention


def cache_of(length: int, kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int, seed: int):
    """A paged cache holding positions [0, length) in shuffled blocks, the rest NaN, and the K/V it holds."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-length // block_size)
    num_blocks = blocks + 3  # 3 blocks nobody owns, left NaN
    table = torch.randperm(num_blocks, generator=g)[:blocks]
    k = torch.randn(length, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(length, kv_heads, head_dim, generator=g).to(dtype)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    pos = torch.arange(length)
    k_cache[table[pos // block_size], pos % block_size] = k
    v_cache[table[pos // block_size], pos % block_size] = v
    return k_cache, v_cache, table, k, v


def reference(q, k, v, context_start: int, scale: float, window: int | None) -> torch.Tensor:
    heads = q.shape[1]
    k, v = (x.double().repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    q_pos = torch.arange(context_start, context_start + q.shape[0])[:, None]
    distance = q_pos - torch.arange(k.shape[0])[None, :]
    visible = (distance >= 0) & (distance < (window or k.shape[0] + 1))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def run(rows: int, context_start: int, heads: int, kv_heads: int, head_dim: int, window: int | None,
        dtype=torch.float32, block_size: int = 16, config: PagedPrefillConfig | None = None, seed: int = 0):
    total = context_start + rows
    k_cache, v_cache, table, k, v = cache_of(total, kv_heads, head_dim, dtype, block_size, seed)
    first = 0 if window is None else max(0, context_start - window + 1) // block_size
    # blocks before the window are gone: NaN, and not in the (window-relative) table
    k_cache[table[:first]] = float("nan")
    v_cache[table[:first]] = float("nan")
    q = torch.randn(rows, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, table[first:].contiguous(), context_start,
                                  head_dim ** -0.5, window, first, config=config)
    ref = reference(q, k, v, context_start, head_dim ** -0.5, window)
    assert out.shape == q.shape and torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rows,context_start", [(1, 0), (37, 0), (70, 0), (9, 40), (50, 21)])
def test_causal_fresh_and_after_a_cached_prefix(rows, context_start):
    assert run(rows, context_start, 4, 2, 64, None) < 1e-5


@pytest.mark.parametrize("window,rows,context_start", [(8, 70, 0), (20, 30, 45), (16, 5, 100), (50, 40, 0)])
def test_sliding_window_over_a_window_relative_table(window, rows, context_start):
    assert run(rows, context_start, 4, 2, 64, window, seed=window) < 1e-5


def test_tiles_smaller_than_the_window_leave_early_rows_empty_not_nan():
    """With 16-row tiles and a window of 4, most query rows see no key in the first key tiles of their program."""
    assert run(40, 3, 4, 1, 32, 4, config=PagedPrefillConfig(block_m=16, block_n=16)) < 1e-5


@pytest.mark.parametrize("head_dim,kv_heads", [(256, 2), (512, 1)])
def test_gemma4_head_dims_in_bf16(head_dim, kv_heads):
    assert run(20, 9, 4, kv_heads, head_dim, 8 if head_dim == 256 else None, dtype=torch.bfloat16) < 1e-2


def test_rejects_what_it_does_not_handle():
    k_cache, v_cache, table, _, _ = cache_of(8, 2, 48, torch.float32, 16, 0)
    with pytest.raises(ValueError, match="powers of two"):
        paged_prefill_attention(torch.zeros(8, 4, 48), k_cache, v_cache, table, 0, 1.0)
    k_cache, v_cache, table, _, _ = cache_of(8, 3, 16, torch.float32, 16, 0)
    with pytest.raises(ValueError, match="groups"):
        paged_prefill_attention(torch.zeros(8, 4, 16), k_cache, v_cache, table, 0, 1.0)
    with pytest.raises(ValueError, match="window"):
        paged_prefill_attention(torch.zeros(8, 3, 16), k_cache, v_cache, table, 0, 1.0, window=0)
