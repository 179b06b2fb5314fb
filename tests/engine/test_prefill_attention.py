"""EngineConfig.prefill_attention reaches attention through the forward context, and only prefill segments see it.

The FP8 kernel itself runs only on CUDA (tests/kernels checks it under the interpreter, gpu_tests on the GPU);
on the CPU the flag must leave every segment on SDPA, with unchanged results.
"""
from __future__ import annotations

import pytest
import torch

from mixquant.layers.attention import TorchAttentionBackend
from mixquant.utils.context import AttentionSegment, ForwardContext


def step(prefill_attention: str):
    """Rows [prefill of a fresh sequence (5) | decode token of a cached one (1) | decode token at position 0 (1)]."""
    table = torch.arange(4)
    segments = [AttentionSegment(0, 5, 0, table), AttentionSegment(5, 6, 9, table), AttentionSegment(6, 7, 0, table)]
    return ForwardContext(num_prefill_rows=5, slot_mapping=torch.zeros(7, dtype=torch.long), segments=segments,
                          prefill_attention=prefill_attention)


@pytest.mark.parametrize("prefill_attention,expected", [("bf16", [False, False, False]),
                                                        ("fp8", [True, False, False])])
def test_only_prefill_segments_are_offered_the_fp8_path(monkeypatch, prefill_attention, expected):
    offered = []

    def record(q, k, v, k_cache, v_cache, seg, scale, fp8=False):
        offered.append(fp8)
        return q[seg.row_start:seg.row_end]

    monkeypatch.setattr(TorchAttentionBackend, "_segment", staticmethod(record))
    q = torch.randn(7, 4, 16)
    TorchAttentionBackend().forward(q, q[:, :2], q[:, :2], None, None, step(prefill_attention), 0.25)
    assert offered == expected


def test_on_the_cpu_the_fp8_flag_changes_nothing():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, heads, 16, generator=g) for heads in (4, 2, 2))
    k_cache = torch.randn(4, 4, 2, 16, generator=g)  # [blocks, block_size, kv_heads, dim]: positions 0..15
    v_cache = torch.randn(4, 4, 2, 16, generator=g)
    backend = TorchAttentionBackend()
    assert torch.equal(backend.forward(q, k, v, k_cache, v_cache, step("fp8"), 0.25),
                       backend.forward(q, k, v, k_cache, v_cache, step("bf16"), 0.25))
