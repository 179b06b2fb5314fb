"""One decoder for the Qwen3, Qwen2 and Llama families, and the skeleton other families build on.

They differ only in switches read from config.json: Qwen3 normalises q and k per head (QK-norm), Qwen2 has
q/k/v biases, Llama neither. A family with another MLP per layer (the experts of Qwen3-MoE, models/qwen3_moe.py)
overrides `CausalLM.make_mlp`; one with other layers (Qwen3.5's Gated DeltaNet and gated attention,
models/qwen3_5.py) overrides `CausalLM.make_layer`; one whose whole stack differs (Gemma 4, models/gemma4.py)
`CausalLM.make_model`.

Tensor parallelism, as Megatron-LM splits a decoder: each rank computes its attention heads (QKV column-parallel,
KV heads replicated where there are fewer than ranks, o_proj row-parallel) and its part of the MLP's intermediate
dim (gate/up column-parallel, down_proj row-parallel): two all-reduces a layer. Norms and RoPE are replicated.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mixquant.distributed.parallel_state import kv_head_replicas, tp_partition
from mixquant.layers.activation import check_activation
from mixquant.layers.attention import Attention
from mixquant.layers.embed_head import LMHead, VocabEmbedding
from mixquant.layers.layernorm import RMSNorm
from mixquant.layers.linear import Linear, PhaseRouted
from mixquant.layers.rotary_embedding import RotaryEmbedding


class SelfAttention(nn.Module):
    """A layer's attention block, called in its parts (project_qkv, attn, o_proj): prefill CUDA graphs replay the
    projections and run attention eagerly between them."""

    def __init__(self, config, prefix: str, qk_norm: bool, qkv_bias: bool, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        # this rank's heads; a rank whose query heads share a KV head holds that KV head (as other ranks do)
        replicas = kv_head_replicas(total_kv_heads, f"{prefix}: num_key_value_heads")
        heads = tp_partition(total_heads, f"{prefix}: num_attention_heads")
        kv_heads = tp_partition(total_kv_heads, f"{prefix}: num_key_value_heads", replicas)
        self.num_heads, self.num_kv_heads = heads.stop - heads.start, kv_heads.stop - kv_heads.start
        q_size, kv_size = total_heads * self.head_dim, total_kv_heads * self.head_dim
        self.qkv_proj = Linear(hidden, [q_size, kv_size, kv_size], qkv_bias, f"{prefix}.qkv_proj",
                               shard_names=["q_proj", "k_proj", "v_proj"], parallel="column",
                               replicas=[1, replicas, replicas])
        self.o_proj = Linear(q_size, [hidden], getattr(config, "attention_bias", False), f"{prefix}.o_proj",
                             parallel="row")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                              kv_heads=kv_heads)

    def project_qkv(self, positions: torch.Tensor, x: torch.Tensor):
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k, self.q_norm, self.k_norm)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config, prefix: str, intermediate_size: int | None = None, activation: str | None = None):
        """activation: the gate's (layers.activation.GATED_ACTIVATIONS), config.hidden_act unless given."""
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.activation = check_activation(activation or config.hidden_act)
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], False, f"{prefix}.gate_up_proj",
                                   shard_names=["gate_proj", "up_proj"], parallel="column")
        self.down_proj = Linear(inter, [config.hidden_size], False, f"{prefix}.down_proj", parallel="row")

    def takes_quantized_rows(self, rows: int) -> bool:
        return self.gate_up_proj.takes_quantized_rows(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # down_proj applies the gated activation to its input itself: an FP8 method quantizes the product as it forms
        return self.down_proj(self.gate_up_proj(x), activation=self.activation)


MakeLayer = Callable[[object, int, str, RotaryEmbedding], nn.Module]  # (config, layer index, prefix, rotary)


class DecoderLayer(nn.Module):
    def __init__(self, config, prefix: str, qk_norm: bool, qkv_bias: bool, rotary_emb: RotaryEmbedding,
                 mlp: nn.Module):
        super().__init__()
        self.self_attn = SelfAttention(config, f"{prefix}.self_attn", qk_norm, qkv_bias, rotary_emb)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        """vLLM's residual passing: each norm also does the residual add before it, in one fused pass."""
        q, k, v, residual = self.before_attention(positions, x, residual)
        return self.after_attention(self.self_attn.attn(q, k, v), residual)

    # The layer on either side of its attention: prefill CUDA graphs capture these, attention runs between them.
    # Each norm quantizes its output itself where the projection after it takes FP8 rows (one pass, not two).
    def before_attention(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        quantize = self.self_attn.qkv_proj.takes_quantized_rows(x.shape[0])
        if residual is None:
            x, residual = self.input_layernorm(x, quantize=quantize), x
        else:
            x, residual = self.input_layernorm(x, residual, quantize=quantize)
        return *self.self_attn.project_qkv(positions, x), residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        x = self.self_attn.o_proj(attn_out.flatten(1))
        x, residual = self.post_attention_layernorm(
            x, residual, quantize=self.mlp.takes_quantized_rows(x.shape[0]))
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, config, max_position: int, make_layer: MakeLayer, unit_offset_norm: bool = False):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary_emb = RotaryEmbedding(config, head_dim, max_position)
        self.layers = nn.ModuleList(make_layer(config, i, f"model.layers.{i}", rotary_emb)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset_norm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.final_norm(x, residual)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's output (x + residual) through the final norm: the hidden states the head reads."""
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """`forward` returns final hidden states for all rows; `compute_logits` runs the head on the rows that need it."""

    qk_norm = False
    qkv_bias = False
    tensor_parallel = True  # whether its layers split over tensor-parallel ranks (docs/distributed.md)
    unit_offset_norms = False  # RMSNorm weights stored zero-centred, scaling by (1 + w) (Qwen3.5)
    # checkpoint name prefixes -> ours; None drops the tensors (the vision and audio towers of a multimodal checkpoint
    # served text-only)
    checkpoint_prefixes: dict[str, str | None] = {}

    def __init__(self, config, max_position: int):
        super().__init__()
        self.config = config
        self.model = self.make_model(config, max_position)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def checkpoint_name(self, name: str) -> str | None:
        """Our name for a checkpoint tensor, or None for one this model does not hold."""
        for prefix, ours in self.checkpoint_prefixes.items():
            if name.startswith(prefix):
                return None if ours is None else ours + name[len(prefix):]
        return name

    def make_model(self, config, max_position: int) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm); a family whose stack differs beyond its layers
        (models/gemma4.py: scaled embeddings, RoPE per layer kind) builds its own, which runs the same way:
        forward(input_ids, positions), embed_tokens, layers with before_attention / after_attention, final_norm."""
        return DecoderModel(config, max_position, self.make_layer, self.unit_offset_norms)

    def make_layer(self, config, layer_index: int, prefix: str, rotary_emb: RotaryEmbedding) -> nn.Module:
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        return DecoderLayer(config, prefix, self.qk_norm, qkv_bias, rotary_emb,
                            self.make_mlp(config, layer_index, f"{prefix}.mlp"))

    def make_mlp(self, config, layer_index: int, prefix: str) -> nn.Module:
        return MLP(config, prefix)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def linear_layers(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def phase_routed_layers(self) -> list[PhaseRouted]:
        """Every layer that computes in its rows' phase precision: the linear layers and the experts."""
        return [m for m in self.modules() if isinstance(m, PhaseRouted)]

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def state_layers(self) -> list[nn.Module]:
        """Layers that carry a per-sequence state from step to step (they declare it in `state_shapes`)."""
        return [m for m in self.modules() if hasattr(m, "state_shapes")]


class Qwen3ForCausalLM(CausalLM):
    qk_norm = True


class Qwen2ForCausalLM(CausalLM):
    qkv_bias = True


class LlamaForCausalLM(CausalLM):
    pass
