"""fp8_prefill_attention under the Triton interpreter (conftest): against its PyTorch emulation and float64 attention.

The emulation (`fp8_attention_reference`) makes the same quantization in the same tile order, so the kernel must
match it to float32 rounding. Float64 attention on the bf16 inputs measures the FP8 error itself: FP8_TOLERANCE,
set from the errors measured at these sizes with a margin (`pytest -s` prints them).
"""
from __future__ import annotations

import pytest
import torch

from mixquant.kernels.fp8_attention import (PrefillConfig, fp8_attention_reference, fp8_prefill_attention,
                                            quantize_blocks_fp8, quantize_blocks_reference)
from mixquant.quantization.fp8 import FP8_MAX

# Relative (Frobenius) error against float64 attention, measured at these sizes: 2.3e-2 (one key: V's rounding
# alone) to 7.8e-2 (the most peaked heads, q.k / sqrt(D) with std 4). K, V and P are each rounded to 3 mantissa
# bits; alone, with q.k std 1, QK^T costs ~3.3e-2, V ~2.7e-2, P ~2.0e-2 (QK^T ~8.4e-2 at std 4). BF16: ~1.6e-3.
FP8_TOLERANCE = 0.1
# Against the emulation of the same arithmetic: measured 0 (bit-identical bf16 outputs) to 1e-5 (an fp8 rounding
# of P flipped where numpy's and torch's exp2 or fp32 sums differ by an ulp).
EMULATION_TOLERANCE = 1e-3
# 1, and lengths on either side of the 64-key and 128-query tiles
LENGTHS = [1, 17, 130, 300]


def make_qkv(tokens: int, q_heads: int, kv_heads: int, head_dim: int, seed: int, dtype=torch.bfloat16):
    """Fresh random q, k, v [tokens, heads, head_dim], never zeros, with magnitudes that differ per head.

    q and k heads span 0.5x-2x, so q.k / sqrt(D) has a standard deviation from 0.25 (near-uniform softmax) to 4
    (peaked); v heads span 0.1x-10x, which only moves V's scales.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(heads, low, high):
        magnitude = torch.logspace(low, high, heads).view(1, heads, 1)
        return (torch.randn(tokens, heads, head_dim, generator=g) * magnitude).to(dtype)

    q = randn(q_heads, -0.3, 0.3)
    k = randn(kv_heads, -0.3, 0.3)[:, torch.randperm(kv_heads, generator=g)]  # pair the magnitudes unevenly
    return q, k, randn(kv_heads, -1, 1)


def exact_attention(q, k, v, scale: float) -> torch.Tensor:
    """Causal GQA softmax attention in float64: [tokens, q_heads, head_dim]."""
    tokens, q_heads, _ = q.shape
    group = q_heads // k.shape[1]
    qd = q.double().transpose(0, 1)
    kd = k.double().repeat_interleave(group, 1).transpose(0, 1)
    vd = v.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = (qd @ kd.transpose(1, 2)) * scale
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    return (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vd).transpose(0, 1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(q, k, v, config: PrefillConfig = PrefillConfig(), label: str = "") -> tuple[float, float]:
    """Runs the kernel into a NaN-poisoned buffer; returns (error vs float64, error vs emulation)."""
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    result = fp8_prefill_attention(q, k, v, scale, out, config=config)
    assert result is out and out.dtype == q.dtype
    assert torch.isfinite(out).all(), f"{label}: rows left unwritten or NaN"
    exact = rel_err(out, exact_attention(q, k, v, scale))
    emulated = rel_err(out, fp8_attention_reference(q, k, v, scale, config))
    print(f"{label}: rel_err vs float64 {exact:.2e}, vs emulation {emulated:.2e}")
    assert exact < FP8_TOLERANCE, (label, exact)
    assert emulated < EMULATION_TOLERANCE, (label, emulated)
    return exact, emulated


@pytest.mark.parametrize("head_dim,q_heads,kv_heads", [(64, 2, 2), (128, 4, 1), (64, 8, 2), (128, 2, 2)],
                         ids=["d64-mha", "d128-gqa4", "d64-gqa4", "d128-mha"])
def test_matches_emulation_and_float64_across_lengths(head_dim, q_heads, kv_heads):
    for i, tokens in enumerate(LENGTHS):
        q, k, v = make_qkv(tokens, q_heads, kv_heads, head_dim, seed=1000 * head_dim + 10 * q_heads + i)
        check(q, k, v, label=f"T={tokens} D={head_dim} {q_heads}/{kv_heads} heads")


@pytest.mark.parametrize("block_m,block_n", [(64, 32), (32, 64), (128, 128)])
def test_other_tile_shapes(block_m, block_n):
    """Query tiles smaller and larger than key tiles: the diagonal spans several key tiles, or part of one."""
    config = PrefillConfig(block_m=block_m, block_n=block_n)
    for i, tokens in enumerate([33, 200]):
        q, k, v = make_qkv(tokens, 4, 2, 64, seed=block_m * 7 + block_n + i)
        check(q, k, v, config, label=f"tiles {block_m}x{block_n} T={tokens}")


def test_engine_layout_views_into_fused_qkv():
    """q, k, v as the decoder hands them over: column slices of one [tokens, q + 2 kv heads, D] projection."""
    tokens, q_heads, kv_heads, head_dim = 150, 8, 2, 128
    qkv = torch.cat(make_qkv(tokens, q_heads, kv_heads, head_dim, seed=7), dim=1)
    q, k, v = qkv.split([q_heads, kv_heads, kv_heads], dim=1)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check(q, k, v, label="fused qkv views")


def test_all_equal_keys_give_exactly_uniform_weights():
    """Every key the same: each query's weights are uniform, so P is 448 everywhere (exact in fp8) and the output
    is the running mean of the dequantized V; only bf16 output rounding remains."""
    tokens, head_dim = 200, 64
    q, k, v = make_qkv(tokens, 4, 1, head_dim, seed=11)
    k = k[:1].expand_as(k).contiguous()
    out = fp8_prefill_attention(q, k, v, head_dim ** -0.5)
    v8, v_scale = quantize_blocks_reference(v, PrefillConfig().block_n)
    v_deq = (v8.double() * v_scale.double().repeat_interleave(PrefillConfig().block_n, 1)[..., None])[0, :tokens]
    running_mean = v_deq.cumsum(0) / torch.arange(1, tokens + 1, dtype=torch.float64)[:, None]
    assert rel_err(out, running_mean[:, None].expand(tokens, 4, head_dim)) < 3e-3
    check(q, k, v, label="all-equal keys")


def test_zero_blocks_and_a_strong_match():
    """Whole quantization blocks of zeros in Q, K and V (the zero-amax scale), and one key made to match one query
    far above the rest: its output row is that key's value to within V's fp8 rounding."""
    tokens, head_dim = 300, 128
    q, k, v = make_qkv(tokens, 4, 2, head_dim, seed=12)
    q[128:256, 1] = 0  # one whole query tile: uniform attention
    k[64:128, 0] = 0
    v[192:256, 1] = 0
    query, key = 290, 40
    k[key, 1] = q[query, 2] * 3  # head 2 reads KV head 1: a score of ~30 there, ~N(0, 3) elsewhere
    check(q, k, v, label="zero blocks + strong match")
    out = fp8_prefill_attention(q, k, v, head_dim ** -0.5)
    assert rel_err(out[query, 2], v[key, 1]) < 5e-2


def test_quantize_blocks_matches_reference_bytes():
    """Per-(head, block) scales and fp8 bytes equal the PyTorch arithmetic, in both layouts, with padding zeroed."""
    tokens, heads, head_dim, block = 100, 3, 64, 32
    g = torch.Generator().manual_seed(5)
    wide = (torch.randn(tokens, heads + 2, head_dim, generator=g) * torch.logspace(-3, 3, tokens)[:, None, None])
    x = wide.to(torch.bfloat16)[:, 1:heads + 1]  # a strided view, magnitudes over six decades
    x[32:64, 2] = 0  # a zero block: the eps scale, zero bytes
    x8, scale = quantize_blocks_fp8(x, block)
    xt8, scale_t = quantize_blocks_fp8(x, block, transpose=True)
    ref8, ref_scale = quantize_blocks_reference(x, block)
    assert x8.shape == (heads, 128, head_dim) and xt8.shape == (heads, head_dim, 128) and scale.shape == (heads, 4)
    assert torch.equal(scale, ref_scale) and torch.equal(scale_t, ref_scale)
    assert torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8))
    assert torch.equal(xt8.view(torch.uint8), ref8.transpose(1, 2).view(torch.uint8))
    assert not x8[:, tokens:].view(torch.uint8).any(), "padding rows must be zero"
    assert x8.float().abs().amax() == FP8_MAX


def test_no_tokens_and_rejected_shapes():
    q, k, v = make_qkv(0, 4, 2, 64, seed=0)
    assert fp8_prefill_attention(q, k, v, 0.125).shape == (0, 4, 64)
    q, k, v = make_qkv(8, 6, 4, 64, seed=0)
    with pytest.raises(ValueError, match="groups"):
        fp8_prefill_attention(q, k, v, 0.125)
    q, k, v = make_qkv(8, 4, 2, 96, seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        fp8_prefill_attention(q, k, v, 0.125)
    q, k, v = make_qkv(8, 4, 2, 64, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="16-bit"):
        fp8_prefill_attention(q, k, v, 0.125)
