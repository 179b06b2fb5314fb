"""FP8 E4M3 W8A8 with row-wise scales: the operand layout `torch._scaled_mm` takes on Hopper.

Weights [N, K] get one scale per output channel, activations [M, K] one per token (computed at runtime). Scales are
dequant multipliers (`amax / 448`), float32 and shaped [rows, 1], exactly what `_scaled_mm` wants as `scale_a` and,
transposed, as `scale_b`. For float32 inputs this is bit-identical to compressed-tensors' `float-quantized` FP8
(`FP8_DYNAMIC` preset, channel strategy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

# Stands in for the scale of an all-zero row so the division below stays finite (the row still quantizes to zeros);
# compressed-tensors uses the same value, which keeps even such rows byte-identical to its checkpoints.
_ZERO_ROW_SCALE = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QuantizedRows:
    """An activation that the kernel producing it has already quantized per token, for a native FP8 linear layer:
    E4M3 rows [M, K] and their float32 scales [M, 1], as quantize_rowwise returns them, and the 16-bit dtype the
    layer computes in. The RMSNorms before the QKV and gate/up projections hand these over (kernels/quant.py), so
    the 16-bit norm is never written and read back."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def quantize_rowwise(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of x with one scale per row; returns (q [..., K] float8_e4m3fn, scale [..., 1] float32).

    The largest element of each row maps to +-448. Statistics are taken in float32 whatever x's dtype (llm-compressor
    would compute the scale and the division in bf16 for a bf16 weight; float32 is never less accurate). amax: the
    rows' largest magnitudes [..., 1] where x holds only part of each row (a tensor-parallel rank's columns).
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) if amax is None else amax.float()) / FP8_MAX
    scale = torch.where(scale == 0, _ZERO_ROW_SCALE, scale)
    # The cast rounds to nearest-even; the clamp guards the cast, which older torch turns into NaN past 448.
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale (row-wise or per-tensor scale), computed in float32 and cast to dtype."""
    return (q.float() * scale.float()).to(dtype)


def scaled_mm_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """What `torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=out_dtype)` computes.

    xq [M, K] and wq [N, K] are float8_e4m3fn, x_scale [M, 1] and w_scale [N, 1] float32 (or per-tensor scalars).
    fp8 products are exact in float32 and the scales are applied once to the float32 accumulator, as in the kernel's
    epilogue; runs on any device.
    """
    acc = xq.float() @ wq.float().t()
    return (acc * x_scale.float() * w_scale.float().t()).to(out_dtype)
