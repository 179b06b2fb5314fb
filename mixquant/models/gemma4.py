"""Gemma 4 (31B dense, 26B-A4B MoE) from the shared layers, as transformers 5's Gemma4ForCausalLM computes it.

Checkpoints: `Gemma4ForConditionalGeneration` (the hub's, served text-only: the language model's tensors under
`model.language_model.`, the vision and audio towers skipped) and `Gemma4ForCausalLM` / gemma4_text.

What sets Gemma 4 apart, each in one place below:
- two kinds of layer from config.layer_types, resolved once into a LayerSpec: sliding layers (head_dim 256, a
  window of 1,024 keys, default RoPE) and full layers (head_dim 512 and their own KV head count from
  per_layer_config, "proportional" RoPE, and with attention_k_eq_v no v_proj: V is the raw K projection);
- RMSNorm with its weight multiplied in float32 (layers.layernorm.rms_norm_fp32), on q and k per head, a weight-free
  one on V, attention scale 1.0;
- each block's output normed before its residual add (so no add fuses into the next norm), a per-layer
  `layer_scalar`, embeddings times sqrt(hidden) in the model dtype, final logits soft-capped at 30;
- gelu_pytorch_tanh MLPs; in the MoE model a dense MLP beside the experts, routed from the residual stream.
Per-layer embeddings (E2B/E4B), KV sharing between layers and bidirectional attention are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixquant.layers.attention import Attention
from mixquant.layers.embed_head import VocabEmbedding
from mixquant.layers.fused_moe import GroupedExperts, Router
from mixquant.layers.layernorm import RMSNormFp32
from mixquant.layers.linear import Linear
from mixquant.layers.rotary_embedding import RotaryEmbedding
from mixquant.models.decoder import MLP, CausalLM

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention, from config.layer_types and per_layer_config."""

    kind: str  # SLIDING or FULL: also the key of its RoPE parameters
    head_dim: int
    num_kv_heads: int
    window: int | None  # sliding layers' window (keys visible to a query, its own included)
    k_eq_v: bool  # no v_proj: V is the raw K projection


def layer_specs(config) -> list[LayerSpec]:
    unsupported = {"hidden_size_per_layer_input (per-layer embeddings)": config.hidden_size_per_layer_input,
                   "num_kv_shared_layers": config.num_kv_shared_layers,
                   "use_bidirectional_attention='all'": config.use_bidirectional_attention == "all"}
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise ValueError(f"Gemma 4 with {', '.join(named)} is not supported (the 31B and 26B-A4B models have none)")
    specs = []
    for i, kind in enumerate(config.layer_types):
        if kind not in (SLIDING, FULL):
            raise ValueError(f"layer {i}: unknown Gemma 4 layer type {kind!r}")
        layer = config.per_layer_config[i]  # head_dim and KV heads with the full layers' overrides applied
        specs.append(LayerSpec(kind, layer.head_dim, layer.num_key_value_heads,
                               config.sliding_window if kind == SLIDING else None,
                               config.attention_k_eq_v and kind == FULL))
    return specs


class ScaledEmbedding(VocabEmbedding):
    """Embeddings times sqrt(hidden), the factor rounded to the model dtype (bf16: 73.5 for 31B's 5,376)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.register_buffer("scale", torch.tensor(hidden_size ** 0.5), persistent=False)  # in the default dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.scale


class Gemma4Attention(nn.Module):
    """Called in its parts (project_qkv, attn, o_proj), as decoder.SelfAttention."""

    def __init__(self, config, spec: LayerSpec, prefix: str, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size] if spec.k_eq_v else [q_size, kv_size, kv_size]
        shards = ["q_proj", "k_proj"] if spec.k_eq_v else ["q_proj", "k_proj", "v_proj"]
        self.qkv_proj = Linear(config.hidden_size, self.sizes, config.attention_bias, f"{prefix}.qkv_proj",
                               shard_names=shards)
        self.o_proj = Linear(q_size, [config.hidden_size], config.attention_bias, f"{prefix}.o_proj")
        self.q_norm = RMSNormFp32(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNormFp32(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNormFp32(self.head_dim, config.rms_norm_eps, has_weight=False)
        self.rotary_emb = rotary_emb  # one table per layer kind, shared
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, 1.0, spec.window)

    def project_qkv(self, positions: torch.Tensor, x: torch.Tensor):
        q, k, *v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v[0].view(-1, self.num_kv_heads, self.head_dim) if v else k  # k_eq_v: V from K before k_norm and RoPE
        q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        return q, k, self.v_norm(v)


class Gemma4Router(nn.Module):
    """Experts for each row from the residual stream: a weight-free norm, times `scale` and hidden^-0.5, a linear
    map, softmax over all experts in float32, the top k renormalised and times their `per_expert_scale`. The
    weights stay float32, as transformers multiplies the experts' outputs by them."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.top_k_experts
        self.norm = RMSNormFp32(config.hidden_size, config.rms_norm_eps, has_weight=False)
        self.proj = Router(config.hidden_size, config.num_experts)
        self.scale = nn.Parameter(torch.ones(config.hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts), requires_grad=False)
        self.root_size = config.hidden_size ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(self.norm(x) * self.scale * self.root_size)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True) * self.per_expert_scale[ids], ids


class Gemma4DecoderLayer(nn.Module):
    """before_attention / after_attention as decoder.DecoderLayer's, for the prefill graphs; the residual passed
    between them is the layer's input (no add fuses into a norm here), and a layer hands on (output, None)."""

    def __init__(self, config, spec: LayerSpec, prefix: str, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4Attention(config, spec, f"{prefix}.self_attn", rotary_emb)
        self.mlp = MLP(config, f"{prefix}.mlp", activation=config.hidden_activation)
        self.input_layernorm = RMSNormFp32(hidden, eps)
        self.post_attention_layernorm = RMSNormFp32(hidden, eps)
        self.pre_feedforward_layernorm = RMSNormFp32(hidden, eps)
        self.post_feedforward_layernorm = RMSNormFp32(hidden, eps)
        self.router = self.experts = None
        if config.enable_moe_block:
            self.router = Gemma4Router(config)
            self.experts = GroupedExperts(config.num_experts, hidden, config.moe_intermediate_size,
                                          f"{prefix}.experts", config.hidden_activation)
            self.pre_feedforward_layernorm_2 = RMSNormFp32(hidden, eps)
            self.post_feedforward_layernorm_1 = RMSNormFp32(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNormFp32(hidden, eps)
        # a parameter rather than transformers' buffer, so that the loader insists on it like on any weight
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: None):
        q, k, v, residual = self.before_attention(positions, x, residual)
        return self.after_attention(self.self_attn.attn(q, k, v), residual)

    def before_attention(self, positions: torch.Tensor, x: torch.Tensor, residual: None):
        return *self.self_attn.project_qkv(positions, self.input_layernorm(x)), x

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        x = residual + self.post_attention_layernorm(self.self_attn.o_proj(attn_out.flatten(1)))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.experts is not None:  # the dense MLP and the experts side by side, the router on the residual
            weights, ids = self.router(x)
            experts = self.experts(self.pre_feedforward_layernorm_2(x), weights, ids)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(experts)
        return (x + self.post_feedforward_layernorm(h)) * self.layer_scalar, None


class Gemma4Model(nn.Module):
    def __init__(self, config, max_position: int):
        super().__init__()
        specs = layer_specs(config)
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size)
        head_dims = {spec.kind: spec.head_dim for spec in specs}
        self.rotary = nn.ModuleDict({kind: RotaryEmbedding(config, head_dim, max_position, layer_type=kind)
                                     for kind, head_dim in head_dims.items()})
        self.layers = nn.ModuleList(Gemma4DecoderLayer(config, spec, f"model.layers.{i}", self.rotary[spec.kind])
                                    for i, spec in enumerate(specs))
        self.norm = RMSNormFp32(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.final_norm(x, residual)

    def final_norm(self, x: torch.Tensor, residual: None) -> torch.Tensor:
        return self.norm(x)


class Gemma4ForCausalLM(CausalLM):
    """Both checkpoint kinds: the hub's multimodal one is served text-only (a gemma4_text one has no prefix)."""

    # its attention projections are built replicated and its two KV geometries are not split by heads yet
    # (docs/distributed.md, "Sharding another family's layers"): refused at tensor_parallel_size > 1
    tensor_parallel = False
    checkpoint_prefixes = {"model.language_model.": "model.", "model.vision_tower.": None,
                           "model.embed_vision.": None, "model.audio_tower.": None, "model.embed_audio.": None}

    def make_model(self, config, max_position: int) -> nn.Module:
        return Gemma4Model(config, max_position)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
