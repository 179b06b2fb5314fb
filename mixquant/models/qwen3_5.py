"""Qwen3.5 (dense, e.g. 9B) and Qwen3.5-MoE: Gated DeltaNet layers interleaved with gated full attention.

`config.layer_types` names each layer's token mixer: "linear_attention" (layers/gated_delta_net.py, with a
per-sequence state in the runner's state pool) or "full_attention" (paged KV, as every other family). Every norm
is the (1 + w) variant in fp32 (`unit_offset`). Full attention: q_proj yields each head's query and its output gate
side by side, q and k are normalised per head, RoPE turns the leading partial_rotary_factor of each head (64 of
256), and the attention output is scaled by sigmoid(gate) before o_proj.

The hub checkpoints are multimodal (Qwen3_5ForConditionalGeneration): the text weights sit under
model.language_model., the vision tower and the multi-token-prediction head are skipped (served text-only).
Qwen3.5-MoE puts in every layer routed experts (always renormalised) plus a shared expert gated per token.
"""
from __future__ import annotations

import torch
from torch import nn

from mixquant.layers.attention import Attention
from mixquant.layers.fused_moe import SparseMoeBlock
from mixquant.layers.gated_delta_net import GatedDeltaNet
from mixquant.layers.layernorm import RMSNorm
from mixquant.layers.linear import Linear
from mixquant.layers.rotary_embedding import RotaryEmbedding
from mixquant.models.decoder import MLP, CausalLM

LAYER_TYPES = ("linear_attention", "full_attention")


class GatedAttention(nn.Module):
    def __init__(self, config, prefix: str, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        # q_proj's rows alternate per head: the head's query, then its gate
        self.qkv_proj = Linear(config.hidden_size, [2 * q_size, kv_size, kv_size], bias, f"{prefix}.qkv_proj",
                               shard_names=["q_proj", "k_proj", "v_proj"])
        self.o_proj = Linear(q_size, [config.hidden_size], bias, f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        q_gate, k, v = self.qkv_proj(x).split(
            [2 * self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1)
        q, gate = q_gate.view(rows, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = k.view(rows, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k, self.q_norm, self.k_norm)
        out = self.attn(q, k, v.view(rows, self.num_kv_heads, self.head_dim)).flatten(1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(rows, -1)))


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, prefix: str, rotary_emb: RotaryEmbedding, mlp: nn.Module):
        super().__init__()
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"{prefix}: layer type {layer_type!r} is not one of {', '.join(LAYER_TYPES)}")
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, f"{prefix}.linear_attn")
        else:
            self.self_attn = GatedAttention(config, f"{prefix}.self_attn", rotary_emb)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        """vLLM's residual passing, as DecoderLayer: each norm also does the residual add before it."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        if self.layer_type == "linear_attention":
            x = self.linear_attn(x)
        else:
            x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class SharedExpertMoeBlock(SparseMoeBlock):
    """Qwen3.5-MoE's MLP: the routed experts plus a shared expert (a gated MLP whose projections run by phase like
    every other), scaled per token by sigmoid(shared_expert_gate(x)), a one-column map kept in the model dtype."""

    def __init__(self, config, prefix: str):
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, prefix, renormalize=True, activation=config.hidden_act)
        self.shared_expert = MLP(config, f"{prefix}.shared_expert", config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen3_5ForCausalLM(CausalLM):
    unit_offset_norms = True
    tensor_parallel = False  # the Gated DeltaNet layers and their state are not split by heads yet
    checkpoint_prefixes = {"model.language_model.": "model.", "model.visual.": None, "mtp.": None}

    def make_layer(self, config, layer_index: int, prefix: str, rotary_emb: RotaryEmbedding) -> nn.Module:
        return Qwen3_5DecoderLayer(config, config.layer_types[layer_index], prefix, rotary_emb,
                                   self.make_mlp(config, layer_index, f"{prefix}.mlp"))


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    def make_mlp(self, config, layer_index: int, prefix: str) -> nn.Module:
        return SharedExpertMoeBlock(config, prefix)
