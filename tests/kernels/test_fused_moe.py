"""The grouped expert GEMMs (kernels/fused_moe.py) under the Triton interpreter (conftest), against the experts'
reference path: each expert one matrix product over the rows routed to it (quantization/expert_methods.py)."""
from __future__ import annotations

import pytest
import torch

from mixquant.kernels.fused_moe import align_by_expert, fused_experts, grouped_gemm
from mixquant.quantization.expert_methods import BF16Experts, FP8Experts


def routing(tokens: int, experts: int, top_k: int, seed: int, skewed: bool = False):
    """Top-k expert ids per row (distinct within a row) and weights summing to 1; `skewed` sends most rows to a
    few experts and leaves some with none."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    if skewed:
        scores[:, : experts // 2] += 2
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (64, 16, 4, 32)])
def test_align_by_expert_pads_each_experts_run(tokens, experts, top_k, block_m):
    _, ids = routing(tokens, experts, top_k, seed=tokens, skewed=True)
    sorted_ids, block_experts, num_padded = align_by_expert(ids, experts, block_m)
    copies = tokens * top_k
    used = sorted_ids[:num_padded.item()]
    valid = used[used < copies]
    assert sorted(valid.tolist()) == list(range(copies))  # every copy once
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert num_padded.item() == int(((counts + block_m - 1) // block_m * block_m).sum())
    for block, expert in enumerate(block_experts[: num_padded.item() // block_m].tolist()):
        members = sorted_ids[block * block_m:(block + 1) * block_m]
        members = members[members < copies].long()
        assert (ids.flatten()[members] == expert).all()  # a block holds one expert's copies
    assert (sorted_ids[num_padded.item():] == copies).all()  # the rest is padding


def test_grouped_gemm_multiplies_each_copy_by_its_expert():
    torch.manual_seed(0)
    tokens, experts, top_k, n, k = 23, 4, 2, 96, 80  # N and K not multiples of the tiles
    a = torch.randn(tokens, k).bfloat16()
    b = torch.randn(experts, n, k).bfloat16()
    _, ids = routing(tokens, experts, top_k, seed=1)
    out = grouped_gemm(a, b, torch.empty(tokens * top_k, n, dtype=torch.bfloat16),
                       align_by_expert(ids, experts, 16), top_k, 16)
    expected = torch.stack([a[c // top_k].float() @ b[ids.flatten()[c]].float().t() for c in range(tokens * top_k)])
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 40])
def test_fused_bf16_experts_equal_the_reference(tokens):
    torch.manual_seed(tokens)
    experts, hidden, inter = 8, 64, 48
    w13 = (torch.randn(experts, 2 * inter, hidden) * 0.1).bfloat16()
    w2 = (torch.randn(experts, hidden, inter) * 0.1).bfloat16()
    x = torch.randn(tokens, hidden).bfloat16()
    weights, ids = routing(tokens, experts, 2, seed=tokens, skewed=True)
    weights = weights.bfloat16()
    ours = fused_experts(x, w13, w2, weights, ids)
    reference = BF16Experts(w13, w2)(x, weights, ids)
    # the kernel applies the routing weight to the float32 accumulator, the reference to the bf16 product
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_fused_fp8_experts_equal_the_emulated_method():
    torch.manual_seed(3)
    experts, hidden, inter, tokens = 8, 64, 48, 33
    method = FP8Experts.from_weight((torch.randn(experts, 2 * inter, hidden) * 0.1).bfloat16(),
                                    (torch.randn(experts, hidden, inter) * 0.1).bfloat16(), native=False)
    x = torch.randn(tokens, hidden).bfloat16()
    weights, ids = routing(tokens, experts, 2, seed=4)
    weights = weights.bfloat16()
    ours = fused_experts(x, method.q13, method.q2, weights, ids, w13_scale=method.s13, w2_scale=method.s2)
    reference = method(x, weights, ids)
    rel = (ours.float() - reference.float()).norm() / reference.float().norm()
    assert rel < 1e-2, rel  # same operands; scales one ulp apart where CUDA's and the CPU's divisions differ
