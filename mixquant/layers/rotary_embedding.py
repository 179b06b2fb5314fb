"""Rotary position embeddings; the scaled variants (YaRN, llama3, linear) come from transformers' own tables."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mixquant.layers.layernorm import RMSNorm, rms_norm


def rope_inverse_frequencies(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Frequencies for the rotated dims: all of a head, or its leading partial_rotary_factor share (Qwen3.5: 64 of
    256; the other types' tables read the factor from the config themselves). layer_type: the kind of layer whose
    parameters to use, where config.rope_parameters is keyed by it (Gemma 4: sliding_attention / full_attention)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear, yarn, llama3, "
                         "proportional)")
    # Gemma 4's "proportional" rotates the first partial_rotary_factor of the frequencies over the whole head (the
    # rest are 0), which is not the partial rotary of the first dims that other models use. On the CPU whatever
    # device the model is built on: these functions copy their tensors to the device they are given.
    with torch.device("cpu"):
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", layer_type=layer_type)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_position: int, layer_type: str | None = None):
        super().__init__()
        inv_freq, attention_scaling = rope_inverse_frequencies(config, head_dim, layer_type)
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq.to(positions.device))
        emb = torch.cat([freqs, freqs], dim=-1)
        # YaRN scales cos/sin (its "attention factor"); other types use 1.0
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        """q: [rows, heads, head_dim], k: [rows, kv_heads, head_dim]; rotate-half layout, as Hugging Face models.

        With Qwen3's per-head QK-norm, pass its two norms: they run in the same pass as the rotation. A table
        narrower than the heads (partial rotary) rotates their leading dims; the rest pass through."""
        rotary_dim = self.cos.shape[-1]
        if q_norm is not None and (q_norm.unit_offset or rotary_dim < q.shape[-1]):
            # norms the fused pass does not do (its form is the plain one, its rows whole heads) run first
            q, k, q_norm, k_norm = q_norm(q), k_norm(k), None, None
        if rotary_dim < q.shape[-1]:
            q_rot, k_rot = apply_rotary(q[..., :rotary_dim], k[..., :rotary_dim], self.cos, self.sin, positions)
            return torch.cat([q_rot, q[..., rotary_dim:]], dim=-1), torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)
        if q_norm is None:
            return apply_rotary(q, k, self.cos, self.sin, positions)
        return apply_rotary(q, k, self.cos, self.sin, positions, q_norm.weight, k_norm.weight, q_norm.eps)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 positions: torch.Tensor, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 eps: float = 0.0):
    """Rotate q and k at `positions`, after the per-head RMSNorm when its weights are given.

    On a GPU, one Triton pass per tensor (one read and one write of it, the table rows gathered inside); on the
    CPU, the eager ops whose rounding it follows."""
    if q.is_cuda:
        from mixquant.kernels.rotary import norm_rope

        return (norm_rope(q, q_weight, eps, cos_table, sin_table, positions),
                norm_rope(k, k_weight, eps, cos_table, sin_table, positions))
    return rotate_eager(q, k, cos_table, sin_table, positions, q_weight, k_weight, eps)


def rotate_eager(q, k, cos_table, sin_table, positions, q_weight=None, k_weight=None, eps=0.0):
    if q_weight is not None:
        q, k = rms_norm.__wrapped__(q, q_weight, eps), rms_norm.__wrapped__(k, k_weight, eps)
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    return _apply(q, cos, sin), _apply(k, cos, sin)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)
