from __future__ import annotations

import torch
import torch.nn.functional as F

from mixquant.utils.compile import fused_on_gpu


@fused_on_gpu
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation on the fused gate/up output [gate | up]: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
