"""Mixture-of-experts layers: a router over all rows in the model dtype, then experts whose rows run by phase.

`GroupedExperts` is a Linear with an expert axis: the experts' gated MLPs as two stacked weights, routed per phase
like Linear (prefill rows through the prefill precision's method, decode rows through the decode one's, in the
same forward pass); models/loader.py gives it its methods (quantization/expert_methods.py). The router stays
unquantized in every phase, as in every published recipe (`ignore: re:.*mlp.gate$`).

Tensor parallelism splits every expert along its intermediate dim (vLLM's tensor-parallel experts): each rank holds
its rows of w13's gate and up parts and the same columns of w2, computes every routed row's partial output, and
the ranks' outputs are summed once per layer. The router is replicated, so every rank routes alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant.distributed.parallel_state import get_tp_size, tensor_model_parallel_all_reduce, tp_partition
from mixquant.layers.activation import check_activation
from mixquant.layers.linear import PhaseRouted

EXPERT_SHARDS = ("gate_proj", "up_proj", "down_proj")  # per-expert checkpoint modules


class GroupedExperts(PhaseRouted):
    """intermediate_size is the rank's part of the checkpoint's total_intermediate_size."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, prefix: str,
                 activation: str = "silu"):
        """activation: the gate's, by config name (layers.activation.GATED_ACTIVATIONS)."""
        super().__init__()
        self.prefix = prefix
        self.num_experts, self.hidden_size, self.total_intermediate_size = num_experts, hidden_size, intermediate_size
        self.intermediate_part = tp_partition(intermediate_size, f"{prefix}: moe_intermediate_size")
        self.intermediate_size = inter = self.intermediate_part.stop - self.intermediate_part.start
        self.intermediate_is_parallel = get_tp_size() > 1
        self.activation = check_activation(activation)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, inter), requires_grad=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = self.route(self.hidden_size, x, topk_weights, topk_ids, activation=self.activation)
        return tensor_model_parallel_all_reduce(out) if self.intermediate_is_parallel else out

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
        """Copies this rank's part of one expert's projection (a torch tensor or a checkpoint slice, read here)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.prefix}: checkpoint expert {expert}, the model has {self.num_experts}")
        inter, hidden = self.total_intermediate_size, self.hidden_size
        expected = (hidden, inter) if shard == "down_proj" else (inter, hidden)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.prefix}.{expert}.{shard}.weight: checkpoint shape {tuple(tensor.shape)}, "
                             f"the model expects {expected}")
        name, rows = self.shard_rows(shard)
        getattr(self, name).data[expert, rows].copy_(self.shard_part((expert, shard), tensor, has_input_dim=True))

    def shard_part(self, shard: tuple[int, str], tensor: torch.Tensor, has_input_dim: bool) -> torch.Tensor:
        """This rank's part of a checkpoint tensor of (expert, projection), as Linear.shard_part: gate_proj and
        up_proj are split by rows, down_proj by input columns."""
        if not tensor.shape:
            return tensor[...]
        if shard[1] != "down_proj":
            per_row = tensor.shape[0] == self.total_intermediate_size
            return tensor[self.intermediate_part if per_row else slice(None)]
        if not has_input_dim:
            return tensor[:]
        return tensor[:, tp_partition(tensor.shape[-1], f"{self.prefix}.{shard[0]}.down_proj: the input columns")]

    def load_stacked(self, name: str, tensor: torch.Tensor) -> list[str]:
        """`gate_up_proj` [E, 2I, H] (gate rows first) or `down_proj` [E, H, I]; returns the shards it filled."""
        inter, part = self.total_intermediate_size, self.intermediate_part
        expected = {"gate_up_proj": (self.num_experts, 2 * inter, self.hidden_size),
                    "down_proj": (self.num_experts, self.hidden_size, inter)}[name]
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.prefix}.{name}: checkpoint shape {tuple(tensor.shape)}, the model expects "
                             f"{expected}")
        if name == "down_proj":
            self.w2.data.copy_(tensor[:, :, part])
            return ["down_proj"]
        local = self.intermediate_size
        self.w13.data[:, :local].copy_(tensor[:, part])
        self.w13.data[:, local:].copy_(tensor[:, inter + part.start:inter + part.stop])
        return ["gate_proj", "up_proj"]


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
