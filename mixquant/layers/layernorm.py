from __future__ import annotations

import torch
from torch import nn

from mixquant.quantization.fp8 import QuantizedRows
from mixquant.utils.compile import fused_on_gpu


@fused_on_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # in fp32 and cast back before the weight, as transformers does, so fp32 runs match it bit for bit
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@fused_on_gpu
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add (rounded in the model dtype, as an unfused model does) and the next norm in one pass."""
    summed = x + residual
    return rms_norm.__wrapped__(summed, weight, eps), summed


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quantize: bool = False):
        """Without a residual: the norm. With one: (norm(x + residual), x + residual). quantize: the norm as
        fp8.QuantizedRows, quantized per token in the same pass (for a layer whose takes_quantized_rows says so)."""
        if quantize:
            from mixquant.kernels.quant import NORM_QUANT_MAX_K, rms_norm_quant_fp8

            if x.shape[-1] <= NORM_QUANT_MAX_K:  # wider rows: the projection quantizes them itself
                q, scale, summed = rms_norm_quant_fp8(x, self.weight, self.eps, residual)
                rows = QuantizedRows(q, scale, x.dtype)
                return rows if residual is None else (rows, summed)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


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
