"""Rotary position embeddings; the scaled variants (YaRN, llama3, linear) come from transformers' own tables."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mixquant.layers.layernorm import RMSNorm, rms_norm
from mixquant.utils.compile import fused_on_gpu


def rope_inverse_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear, yarn, llama3)")
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_position: int):
        super().__init__()
        inv_freq, attention_scaling = rope_inverse_frequencies(config, head_dim)
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq.to(positions.device))
        emb = torch.cat([freqs, freqs], dim=-1)
        # YaRN scales cos/sin (its "attention factor"); other types use 1.0
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        """q: [rows, heads, head_dim], k: [rows, kv_heads, head_dim]; rotate-half layout, as Hugging Face models.

        With Qwen3's per-head QK-norm, pass its two norms: they run in the same fused pass as the rotation (one
        read and one write of q and k instead of three, and no per-layer gather of the cos/sin rows)."""
        if q_norm is None:
            return apply_rotary(q, k, self.cos, self.sin, positions)
        return norm_and_rotate(q, k, q_norm.weight, k_norm.weight, q_norm.eps, self.cos, self.sin, positions)


@fused_on_gpu
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 positions: torch.Tensor):
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    return _apply(q, cos, sin), _apply(k, cos, sin)


@fused_on_gpu
def norm_and_rotate(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor):
    q, k = rms_norm.__wrapped__(q, q_weight, eps), rms_norm.__wrapped__(k, k_weight, eps)
    return apply_rotary.__wrapped__(q, k, cos_table, sin_table, positions)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)
