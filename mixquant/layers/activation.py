from __future__ import annotations

import torch
import torch.nn.functional as F

from mixquant.utils.compile import fused_on_gpu


@fused_on_gpu
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation on the fused gate/up output [gate | up]: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@fused_on_gpu
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gemma's gated activation (config name gelu_pytorch_tanh): gelu(gate, tanh approximation) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# A gated MLP's activation by its config name (hidden_act / hidden_activation): [gate | up] -> act(gate) * up
GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_pytorch_tanh": gelu_tanh_and_mul}


def check_activation(name: str) -> str:
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(GATED_ACTIVATIONS)}")
    return name
