from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixquant.quantization.fp8 import QuantizedRows
from mixquant.utils.compile import fused_on_gpu


@fused_on_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """In fp32 and cast back before the weight, as transformers does, so fp32 runs match it bit for bit.

    unit_offset: the weight is stored zero-centred and scales by (1 + w) in fp32, before the cast back (Qwen3.5's
    norms, transformers' Qwen3_5RMSNorm)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (x * (1.0 + weight.float())).to(dtype)
    return weight * x.to(dtype)


@fused_on_gpu
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add (rounded in the model dtype, as an unfused model does) and the next norm in one pass."""
    summed = x + residual
    return rms_norm.__wrapped__(summed, weight, eps, unit_offset), summed


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        # a zero-centred weight starts at 0, i.e. scale 1, as transformers initialises it
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quantize: bool = False):
        """Without a residual: the norm. With one: (norm(x + residual), x + residual). quantize: the norm as
        fp8.QuantizedRows, quantized per token in the same pass (for a layer whose takes_quantized_rows says so)."""
        if quantize and not self.unit_offset:  # the fused kernel has the plain form; the projection quantizes
            from mixquant.kernels.quant import NORM_QUANT_MAX_K, rms_norm_quant_fp8

            if x.shape[-1] <= NORM_QUANT_MAX_K:  # wider rows: the projection quantizes them itself
                q, scale, summed = rms_norm_quant_fp8(x, self.weight, self.eps, residual)
                rows = QuantizedRows(q, scale, x.dtype)
                return rows if residual is None else (rows, summed)
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.unit_offset)
        return add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset)


@fused_on_gpu
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * silu(gate), the gate and the product in fp32 (transformers' Qwen3_5RMSNormGated)."""
    return (rms_norm.__wrapped__(x, weight, eps) * F.silu(gate.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet's output norm: over each head's values, gated by a projection of the layer's input."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


@fused_on_gpu
def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4's form (transformers' Gemma4RMSNorm): the weight multiplies the float32 normalised rows before the
    cast back, where rms_norm casts first; weight None: no weight (Gemma 4's v_norm and router norm)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)  # pow, not rsqrt: transformers' rounding
    return (x if weight is None else x * weight.float()).to(dtype)


class RMSNormFp32(nn.Module):
    """rms_norm_fp32 as a layer; has_weight=False for the weight-free norms."""

    def __init__(self, hidden_size: int, eps: float, has_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False) if has_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_fp32(x, self.weight, self.eps)
