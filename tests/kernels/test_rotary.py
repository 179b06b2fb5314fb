"""norm_rope under the Triton interpreter (conftest) against the eager QK-norm and rotation it replaces on GPUs.

The kernel follows the eager ops' rounding step by step; only the order in which the norm sums its squares (two
half-rows, then their sum) and the interpreter's rsqrt differ, by an ulp of float32 before the rounding to 16 bits.
So nearly every element matches exactly, and the rest by one 16-bit step of a normed value (which the rotation's
sum of two products may leave in a smaller result): the normed heads are of unit scale, a few units at most.
"""
from __future__ import annotations

import pytest
import torch

from mixquant.kernels.rotary import norm_rope
from mixquant.layers.rotary_embedding import rotate_eager


def tables(max_position: int, head_dim: int, theta: float = 1e6):
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q and k as the engine hands them on: strided views into one fused qkv row."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 3).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)


def assert_close_to_eager(out: torch.Tensor, ref: torch.Tensor):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert (out.float() - ref.float()).abs().max() <= 8 * torch.finfo(ref.dtype).eps
    assert (out == ref).float().mean() > 0.99


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (6, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_and_rotation_match_eager(heads, kv_heads, head_dim, dtype):
    q, k = qkv_views(37, heads, kv_heads, head_dim, dtype, seed=heads)
    g = torch.Generator().manual_seed(1)
    q_weight, k_weight = ((1 + 0.2 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(2))
    cos, sin = tables(5000, head_dim)
    positions = torch.randint(0, 5000, (37,), generator=g)
    q_ref, k_ref = rotate_eager(q, k, cos, sin, positions, q_weight, k_weight, 1e-6)
    assert_close_to_eager(norm_rope(q, q_weight, 1e-6, cos, sin, positions), q_ref)
    assert_close_to_eager(norm_rope(k, k_weight, 1e-6, cos, sin, positions), k_ref)


def test_rotation_alone_is_exact():
    """Without the norm nothing is summed: every element equals the eager rotation."""
    q, k = qkv_views(9, 4, 2, 128, torch.bfloat16, seed=5)
    cos, sin = tables(64, 128)
    positions = torch.tensor([0, 1, 2, 63, 5, 5, 17, 40, 8])
    q_ref, k_ref = rotate_eager(q, k, cos, sin, positions)
    assert torch.equal(norm_rope(q, None, 0.0, cos, sin, positions), q_ref)
    assert torch.equal(norm_rope(k, None, 0.0, cos, sin, positions), k_ref)
    # position 0 is the identity
    assert torch.equal(norm_rope(q[:1], None, 0.0, cos, sin, positions[:1]), q[:1])


def test_no_tokens_and_rejected_layouts():
    cos, sin = tables(8, 64)
    empty = torch.empty(0, 2, 64, dtype=torch.bfloat16)
    assert norm_rope(empty, None, 0.0, cos, sin, torch.empty(0, dtype=torch.long)).shape == (0, 2, 64)
    strided_dims = torch.zeros(3, 2, 128, dtype=torch.bfloat16)[..., ::2]
    with pytest.raises(ValueError, match="contiguous last dim"):
        norm_rope(strided_dims, None, 0.0, cos, sin, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tables"):
        norm_rope(torch.zeros(3, 2, 32, dtype=torch.bfloat16), None, 0.0, cos, sin, torch.zeros(3, dtype=torch.long))
