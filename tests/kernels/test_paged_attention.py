"""paged_decode_attention against a float64 gather-and-softmax reference, under the Triton interpreter (conftest)."""
from __future__ import annotations

import math

import pytest
import torch

from mixquant.kernels import paged_attention
from mixquant.kernels.paged_attention import DecodeConfig, default_num_splits, paged_decode_attention


def reference(q, k_cache, v_cache, block_tables, context_lens, scale, window=None) -> torch.Tensor:
    """Each row's cached positions (its last `window` ones, through a table starting at the first one's block)
    gathered through its block table; softmax in float64."""
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = []
    for b, length in enumerate(context_lens.tolist()):
        first = 0 if window is None else max(0, length - window)
        pos = torch.arange(first, length)
        blocks = block_tables[b, pos // block_size - first // block_size].long()
        k = k_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # [length, heads, dim]
        v = v_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), k) * scale, dim=-1)
        out.append(torch.einsum("hl,lhd->hd", weights, v))
    return torch.stack(out)


def make_inputs(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                block_size: int = 16, pad_blocks: int = 2, table_dtype: torch.dtype = torch.int32, seed: int = 0):
    """A cache full of NaN except the slots holding each row's positions; table padding points at NaN blocks.

    Rows own disjoint, shuffled blocks, so wrong indexing reads another row's data or NaN, never a lucky match.
    """
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / block_size) for n in context_lens]
    max_blocks = max(needed) + pad_blocks
    garbage = 3  # blocks no row owns, left NaN
    num_blocks = sum(needed) + garbage
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    owner = torch.randperm(num_blocks, generator=g)
    garbage_ids = owner[sum(needed):]
    tables = garbage_ids[torch.randint(0, garbage, (len(context_lens), max_blocks), generator=g)]
    first = 0
    for b, (n, length) in enumerate(zip(needed, context_lens)):
        tables[b, :n] = owner[first:first + n]
        first += n
        pos = torch.arange(length)
        slots = (tables[b, pos // block_size], pos % block_size)
        k_cache[slots] = torch.randn(length, num_kv_heads, head_dim, generator=g).to(dtype)
        v_cache[slots] = torch.randn(length, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor(context_lens, dtype=table_dtype)
    return q, k_cache, v_cache, tables.to(table_dtype), lens


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
# 1, and lengths on either side of the 16-position blocks and 64-position tiles
LENGTHS = [1, 15, 16, 17, 63, 64, 65, 130, 201]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_across_groups_dtypes_and_splits(num_heads, num_kv_heads, dtype):
    q, k_cache, v_cache, tables, lens = make_inputs(LENGTHS, num_heads, num_kv_heads, 64, dtype)
    ref = reference(q, k_cache, v_cache, tables, lens, 0.125)
    # one split (written directly), an odd count whose parts end mid-tile for some rows, and more splits than
    # the longest row has tiles (most programs exit early)
    for num_splits in (1, 3, 8):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=num_splits)
        assert out.dtype == dtype and out.shape == q.shape
        assert torch.isfinite(out).all(), f"NaN from the padding leaked with {num_splits} splits"
        assert rel_err(out, ref) < TOLERANCE[dtype], num_splits


@pytest.mark.parametrize("block_size,block_n", [(16, 16), (32, 16), (128, 64)])
def test_tiles_smaller_and_larger_than_cache_blocks(block_size, block_n):
    q, k_cache, v_cache, tables, lens = make_inputs([1, 31, 33, 150, 300], 8, 2, 64, torch.float32,
                                                    block_size=block_size, table_dtype=torch.int64, seed=1)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, num_splits=4,
                                 config=DecodeConfig(block_n=block_n))
    assert rel_err(out, reference(q, k_cache, v_cache, tables, lens, 0.125)) < 1e-5


def test_head_dim_128_strided_q_and_given_out():
    """q as a view into a fused qkv row, as the decoder layer hands it over; the result lands in `out`."""
    q, k_cache, v_cache, tables, lens = make_inputs([5, 77, 140], 8, 2, 128, torch.bfloat16, seed=2)
    qkv = torch.randn(3, 12, 128).to(torch.bfloat16)
    qkv[:, :8] = q
    out = torch.full((3, 8, 128), float("nan"), dtype=torch.bfloat16)
    result = paged_decode_attention(qkv[:, :8], k_cache, v_cache, tables, lens, 128 ** -0.5, out, num_splits=2)
    assert result is out
    assert rel_err(out, reference(q, k_cache, v_cache, tables, lens, 128 ** -0.5)) < 1e-2


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (256, torch.bfloat16), (512, torch.bfloat16)])
def test_sliding_window_reads_window_relative_tables(head_dim, dtype):
    """A row attends to its last 20 positions; its table starts at the block of the first of them, and the blocks
    before it are gone (NaN here)."""
    window, lengths = 20, [1, 5, 20, 21, 40, 70]
    q, k_cache, v_cache, tables, lens = make_inputs(lengths, 4, 2, head_dim, dtype, seed=4)
    windowed = torch.empty_like(tables)
    for b, length in enumerate(lengths):
        first = max(0, length - window) // 16
        k_cache[tables[b, :first]] = float("nan")
        v_cache[tables[b, :first]] = float("nan")
        windowed[b] = torch.cat([tables[b, first:], tables[b, :first]])  # the entries past the window are unread
    ref = reference(q, k_cache, v_cache, windowed, lens, 0.125, window)
    for num_splits in (1, 3):
        out = paged_decode_attention(q, k_cache, v_cache, windowed, lens, 0.125, window=window, num_splits=num_splits)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOLERANCE[dtype], num_splits


def test_default_splits_follow_shapes_only():
    cpu = torch.device("cpu")
    sms = paged_attention._sm_count(cpu)
    assert default_num_splits(1, 8, 128 * 1024, cpu) == paged_attention.MAX_SPLITS
    assert default_num_splits(1, 8, 40, cpu) == 1  # one tile: nothing to split
    assert default_num_splits(256, 8, 32768, cpu) == 1  # the batch alone fills the chip
    assert default_num_splits(1, 8, 2048, cpu) == min(2048 // 64, math.ceil(4 * sms / 8))
    # the default path (4 splits here: the table is 15 blocks wide) still matches
    q, k_cache, v_cache, tables, lens = make_inputs(LENGTHS, 8, 2, 64, torch.float32, seed=3)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert rel_err(out, reference(q, k_cache, v_cache, tables, lens, 0.125)) < 1e-5


def test_rejects_shapes_it_does_not_handle():
    q, k_cache, v_cache, tables, lens = make_inputs([4], 6, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="groups"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    q, k_cache, v_cache, tables, lens = make_inputs([4], 4, 2, 48, torch.float32)
    with pytest.raises(ValueError, match="powers of two"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
