"""Model shapes to benchmark with random weights: real layer shapes, no checkpoint download."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

SHAPES = {
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False, torch_dtype="bfloat16"),
    # Qwen/Qwen3-32B's config.json: the 31B class (Gemma-4-31B's size); 61.0 GiB of BF16 weights, and fp8/bf16 adds
    # a 29.1 GiB FP8 copy of the linear layers: 90 GiB, more than one H100 holds
    "qwen3-32b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=5120,
                      intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                      head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                      rope_theta=1000000.0, tie_word_embeddings=False, torch_dtype="bfloat16"),
    # Qwen/Qwen3-30B-A3B's config.json: 128 experts, 8 a token, every layer sparse
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          tie_word_embeddings=False, torch_dtype="bfloat16"),
    # Qwen3.5-9B's text decoder (the hub checkpoint is Qwen3_5ForConditionalGeneration; its vision tower is not
    # served): 24 Gated DeltaNet layers and 8 gated full-attention layers, every 4th
    "qwen3.5-9b": dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", hidden_size=4096,
                       intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=256, vocab_size=248320, max_position_embeddings=262144, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                        "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                                        "mrope_interleaved": True},
                       linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                       linear_num_key_heads=16, linear_num_value_heads=32,
                       layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
                       tie_word_embeddings=False, torch_dtype="bfloat16"),
    # google/gemma-4-31B-it's text config as third-party copies of its config.json give it (not checked against the
    # hub): layers 5 sliding (16 KV heads of 256, window 1,024) to 1 full (4 KV heads of 512, K = V); text only
    "gemma4-31b": dict(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", hidden_size=5376,
                       intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
                       head_dim=256, global_head_dim=512, num_global_key_value_heads=4, attention_k_eq_v=True,
                       sliding_window=1024, vocab_size=262144, max_position_embeddings=262144, rms_norm_eps=1e-6,
                       hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, tie_word_embeddings=True,
                       hidden_size_per_layer_input=0, torch_dtype="bfloat16"),
    # google/gemma-4-26B-A4B-it (one third-party source): 128 experts, 8 a token, beside a dense MLP in every layer
    "gemma4-26b-a4b": dict(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", hidden_size=2816,
                           intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
                           sliding_window=1024, enable_moe_block=True, num_experts=128, top_k_experts=8,
                           moe_intermediate_size=704, vocab_size=262144, max_position_embeddings=262144,
                           rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0,
                           tie_word_embeddings=True, hidden_size_per_layer_input=0, torch_dtype="bfloat16"),
}
YARN_128K = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
             "max_position_embeddings": 131072}


def shape_dir(name: str) -> Path:
    """A folder holding only config.json for the named shape (engines load it with load_format='dummy')."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    path = Path(tempfile.gettempdir()) / f"mixquant-shape-{name}"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return path


def _layer_types(config) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def is_sparse_layer(config, index: int) -> bool:
    """Whether layer `index` of a MoE config has experts (Qwen3-MoE's rule, Gemma 4's enable_moe_block; dense
    configs have none)."""
    if hasattr(config, "enable_moe_block"):
        return config.enable_moe_block
    return (getattr(config, "num_experts", 0) > 0 and index not in (getattr(config, "mlp_only_layers", None) or [])
            and (index + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


def experts_per_token(config) -> int:
    return getattr(config, "num_experts_per_tok", None) or config.top_k_experts


def _attention_geometry(config) -> list[tuple[int, int, bool, int | None]]:
    """(KV heads, head_dim, K = V, window) of each layer's attention: Gemma 4's by layer type, the same for every
    layer otherwise."""
    if config.model_type == "gemma4_text":
        from mixquant.models.gemma4 import layer_specs

        return [(s.num_kv_heads, s.head_dim, s.k_eq_v, s.window) for s in layer_specs(config)]
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [(config.num_key_value_heads, d, False, None)] * config.num_hidden_layers


def _mlp_params(config, index: int) -> int:
    """The dense MLP, or the router, the top-k experts a token is routed to and a shared expert if there is one;
    Gemma 4's MoE layers have the dense MLP beside the experts."""
    h = config.hidden_size
    dense = 3 * h * config.intermediate_size
    if not is_sparse_layer(config, index):
        return dense
    shared = getattr(config, "shared_expert_intermediate_size", 0)
    return (h * config.num_experts + experts_per_token(config) * 3 * h * config.moe_intermediate_size
            + (3 * h * shared + h if shared else 0) + (dense if getattr(config, "enable_moe_block", False) else 0))


def linear_params(config) -> int:
    """Weights one token's decoder linear layers multiply by (prefill_flops adds the head). Qwen3.5's full-attention
    layers project a query and an output gate per head; its Gated DeltaNet layers project q, k, v, z, b, a and out;
    Gemma 4's layers have their own geometry by kind, and its K = V layers no v_proj."""
    h, heads = config.hidden_size, config.num_attention_heads
    types = _layer_types(config)
    hybrid = "linear_attention" in types
    total = 0
    for index, (kind, (kv, d, k_eq_v, _)) in enumerate(zip(types, _attention_geometry(config))):
        if kind == "linear_attention":
            keys = config.linear_num_key_heads * config.linear_key_head_dim
            values = config.linear_num_value_heads * config.linear_value_head_dim
            total += h * (2 * keys + 2 * values + 2 * config.linear_num_value_heads) + values * h
        else:
            total += h * ((2 if hybrid else 1) * heads + (1 if k_eq_v else 2) * kv) * d + heads * d * h
        total += _mlp_params(config, index)
    return total


def prefill_flops(config, tokens: int) -> float:
    """Linear layers for every token, the head for the last one, causal attention (QK^T and PV) over all earlier keys
    or a sliding window's, and for Gated DeltaNet layers the recurrence counted per token (state decay, its read by
    k and by q, the delta write: about 6 multiply-adds per state element; the chunked form spends some more)."""
    heads = config.num_attention_heads
    types = _layer_types(config)
    attention = 0.0
    for kind, (_, d, _, window) in zip(types, _attention_geometry(config)):
        if kind != "linear_attention":
            span = tokens if window is None else min(window, tokens)
            pairs = span * (span + 1) / 2 + (tokens - span) * span  # sum over positions p of min(p + 1, span)
            attention += 2 * 2 * heads * d * pairs
    recurrence = 0.0
    if "linear_attention" in types:
        state = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
        recurrence = 2 * 6 * state * tokens * types.count("linear_attention")
    return 2 * linear_params(config) * tokens + 2 * config.hidden_size * config.vocab_size + attention + recurrence
