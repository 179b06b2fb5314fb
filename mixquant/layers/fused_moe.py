"""Mixture-of-experts layers: a router over all rows in the model dtype, then experts whose rows run by phase.

`GroupedExperts` is a Linear with an expert axis: the experts' gated MLPs as two stacked weights, routed per phase
like Linear (prefill rows through the prefill precision's method, decode rows through the decode one's, in the
same forward pass); models/loader.py gives it its methods (quantization/expert_methods.py). The router stays
unquantized in every phase, as in every published recipe (`ignore: re:.*mlp.gate$`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant.layers.activation import check_activation
from mixquant.layers.linear import PhaseRouted

EXPERT_SHARDS = ("gate_proj", "up_proj", "down_proj")  # per-expert checkpoint modules


class GroupedExperts(PhaseRouted):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, prefix: str,
                 activation: str = "silu"):
        """activation: the gate's, by config name (layers.activation.GATED_ACTIVATIONS)."""
        super().__init__()
        self.prefix = prefix
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation = check_activation(activation)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.route(self.hidden_size, x, topk_weights, topk_ids, activation=self.activation)

    def set_methods(self, prefill, decode):
        super().set_methods(prefill, decode)
        if not (prefill.uses_model_weight or decode.uses_model_weight):
            self.w13 = self.w2 = None  # neither phase reads the model-dtype copy: give its memory back

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"activation={self.activation}, prefill={self.prefill_method}, decode={self.decode_method}")

    # ---- checkpoint layouts: one module per expert (the hub's Qwen3-MoE), or 3-D tensors (transformers 5) ---------

    def shard_rows(self, shard: str) -> tuple[str, slice]:
        """The stacked parameter a per-expert checkpoint module fills, and which of its rows."""
        inter = self.intermediate_size
        return {"gate_proj": ("w13", slice(0, inter)), "up_proj": ("w13", slice(inter, 2 * inter)),
                "down_proj": ("w2", slice(None))}[shard]

    def load_expert(self, expert: int, shard: str, tensor: torch.Tensor):
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.prefix}: checkpoint expert {expert}, the model has {self.num_experts}")
        name, rows = self.shard_rows(shard)
        target = getattr(self, name).data[expert, rows]
        if tensor.shape != target.shape:
            raise ValueError(f"{self.prefix}.{expert}.{shard}.weight: checkpoint shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        target.copy_(tensor)

    def load_stacked(self, name: str, tensor: torch.Tensor) -> list[str]:
        """`gate_up_proj` [E, 2I, H] (gate rows first) or `down_proj` [E, H, I]; returns the shards it filled."""
        param, shards = {"gate_up_proj": (self.w13, ["gate_proj", "up_proj"]),
                         "down_proj": (self.w2, ["down_proj"])}[name]
        if tensor.shape != param.shape:
            raise ValueError(f"{self.prefix}.{name}: checkpoint shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        param.data.copy_(tensor)
        return shards


class Router(nn.Module):
    """Expert logits in the model dtype, one linear map over all rows of the step."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def softmax_top_k(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-style routing: softmax in float32 over all experts, the top k, renormalised to sum 1 if asked; weights
    come back in the logits' dtype."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE's MLP: `gate` routes every row, the experts compute it (Qwen3.5-MoE adds a shared expert)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, prefix: str,
                 renormalize: bool, activation: str):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size, f"{prefix}.experts", activation)

    def takes_quantized_rows(self, rows: int) -> bool:
        return False  # the router reads the norm's output in the model dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_top_k(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)
