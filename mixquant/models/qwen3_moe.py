"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, with experts in place of the dense MLP.

A layer is sparse unless config.mlp_only_layers names it or decoder_sparse_step skips it (both as transformers
reads them); norm_topk_prob is read from the config, whose class default (False) differs from the released
models' (True).
"""
from __future__ import annotations

from torch import nn

from mixquant.layers.fused_moe import SparseMoeBlock
from mixquant.models.decoder import MLP, Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_mlp(self, config, layer_index: int, prefix: str) -> nn.Module:
        sparse = (layer_index not in (config.mlp_only_layers or [])
                  and config.num_experts > 0 and (layer_index + 1) % config.decoder_sparse_step == 0)
        if not sparse:
            return MLP(config, prefix)
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, prefix, renormalize=config.norm_topk_prob,
                              activation=config.hidden_act)
