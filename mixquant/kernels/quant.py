"""Per-token FP8 E4M3 quantization of activations in one Triton kernel.

Computes what `mixquant.quantization.fp8.quantize_rowwise` computes on a CUDA device, bit for bit, in one read of x
instead of the half-dozen passes (abs, amax, divide, where, clamp, cast) that eager PyTorch makes over it. The same
kernel can first apply the gated MLP's activation-and-multiply (SiLU or Gemma's tanh GELU), so that the activation the
down projection quantizes is
never written in 16 bits and read back (the issue's measurement: quantizing in separate passes erased FP8's gain);
`rms_norm_quant_fp8` does the same for the RMSNorm (and residual add) before the QKV and gate/up projections.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixquant.quantization.fp8 import _ZERO_ROW_SCALE, FP8_DTYPE, FP8_MAX

# Rows up to this many elements are held in registers (one read of x); longer rows are read twice, in chunks.
_WHOLE_ROW_MAX = 16384
_CHUNK = 4096
NORM_QUANT_MAX_K = _WHOLE_ROW_MAX  # rms_norm_quant_fp8 holds a row in registers


@triton.jit
def _nan_max(a, b):
    # torch's amax and clamp propagate NaN; Triton's max and clamp drop it unless told
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_scale(amax, FP8_MAX: tl.constexpr, ZERO_ROW_SCALE: tl.constexpr):
    # quantize_rowwise writes amax / 448, but torch on CUDA divides by a Python scalar as a multiply by the
    # scalar's float32 reciprocal (a true division only on the CPU); the multiply is what matches it on the GPU
    scale = amax * (1.0 / FP8_MAX)
    return tl.where(scale == 0, ZERO_ROW_SCALE, scale)


@triton.jit
def _quantize(x, scale, FP8_MAX: tl.constexpr):
    # x / scale between two tensors is an IEEE division in torch; Triton's `/` is the approximate div.full.f32
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return q.to(tl.float8e4nv, fp_downcast_rounding="rtne")


# _per_token_quant_kernel's ACTIVATION for a gated MLP's [gate | up] rows, by config name (0: plain rows)
_ACTIVATION_CODES = {"silu": 1, "gelu_pytorch_tanh": 2}
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _load_row(x_row, offs, mask, K, ACTIVATION: tl.constexpr):
    """K values of a row in float32: x itself, or act(gate) * up of a [gate | up] row of 2K."""
    if ACTIVATION == 0:
        return tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_row + offs, mask=mask, other=0.0)
    up = tl.load(x_row + K + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # rounded to x's dtype after the activation and after the product, as the unfused silu_and_mul /
    # gelu_tanh_and_mul are (eager, and compiled with emulate_precision_casts); the sigmoid is the compiled SiLU's,
    # tanh(y) = 2 sigmoid(2y) - 1 may differ from the compiled GELU's tanh in the last float32 bit
    if ACTIVATION == 1:
        act = (g * tl.sigmoid(g)).to(gate.dtype)
    else:
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        act = (0.5 * g * (2.0 * tl.sigmoid(2.0 * inner))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
                            BLOCK_K: tl.constexpr, WHOLE_ROW: tl.constexpr, ACTIVATION: tl.constexpr,
                            FP8_MAX: tl.constexpr, ZERO_ROW_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # M * K may pass 2**31
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK_K)
    if WHOLE_ROW:
        mask = offs < K
        x = _load_row(x_row, offs, mask, K, ACTIVATION)
        scale = _row_scale(tl.reduce(tl.abs(x), 0, _nan_max), FP8_MAX, ZERO_ROW_SCALE)
        tl.store(q_row + offs, _quantize(x, scale, FP8_MAX), mask=mask)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)  # masked lanes load 0, which never raises an |x| maximum
        for start in range(0, K, BLOCK_K):
            mask = start + offs < K
            amax = _nan_max(amax, tl.abs(_load_row(x_row, start + offs, mask, K, ACTIVATION)))
        scale = _row_scale(tl.reduce(amax, 0, _nan_max), FP8_MAX, ZERO_ROW_SCALE)
        for start in range(0, K, BLOCK_K):  # the second read of the row mostly hits L2
            mask = start + offs < K
            x = _load_row(x_row, start + offs, mask, K, ACTIVATION)
            tl.store(q_row + start + offs, _quantize(x, scale, FP8_MAX), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _rms_norm_quant_kernel(x_ptr, residual_ptr, weight_ptr, summed_ptr, q_ptr, scale_ptr, K, eps,
                           stride_x, stride_r, stride_s, stride_q, BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           FP8_MAX: tl.constexpr, ZERO_ROW_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        # the residual add rounded to x's dtype, as the unfused add is
        residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(summed_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.math.div_rn(tl.sum(xf * xf, 0), K.to(tl.float32)) + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # layernorm.rms_norm's roundings: the normalised row to x's dtype, then its product with the weight
    y = (weight * (xf * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    scale = _row_scale(tl.reduce(tl.abs(y), 0, _nan_max), FP8_MAX, ZERO_ROW_SCALE)
    tl.store(q_ptr + row * stride_q + offs, _quantize(y, scale, FP8_MAX), mask=mask)
    tl.store(scale_ptr + row, scale)


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """per_token_quant_fp8(rms_norm(x [+ residual])) in one pass that never writes the 16-bit norm.

    x and residual [M, K] in one 16-bit dtype, weight [K] in it too (layernorm.rms_norm's product is then rounded
    to it). Returns (q [M, K] float8_e4m3fn, scale [M, 1] float32, x + residual or None without a residual): what
    an FP8 linear layer after the norm takes, and the next residual."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected x of shape [M, K] with contiguous rows, got {tuple(x.shape)} {x.stride()}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"expected a contiguous {x.dtype} weight of shape ({x.shape[1]},), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match x {x.dtype} "
                         f"{tuple(x.shape)} with contiguous rows")
    m, k = x.shape
    if k > NORM_QUANT_MAX_K:
        raise ValueError(f"rows of up to {NORM_QUANT_MAX_K} values are normalised in one pass, got {k}")
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    summed = None if residual is None else torch.empty_like(x)
    if m:
        block_k = triton.next_power_of_2(k)
        _rms_norm_quant_kernel[(m,)](
            x, x if residual is None else residual, weight, x if summed is None else summed, q, scale, k, eps,
            x.stride(0), x.stride(0) if residual is None else residual.stride(0),
            0 if summed is None else summed.stride(0), q.stride(0), BLOCK_K=block_k,
            HAS_RESIDUAL=residual is not None, FP8_MAX=FP8_MAX, ZERO_ROW_SCALE=_ZERO_ROW_SCALE,
            num_warps=8 if block_k >= 8192 else 4, enable_fp_fusion=False)
    return q, scale, summed


def per_token_quant_fp8(x: torch.Tensor, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32) -> (q [M, K] float8_e4m3fn, scale [M, 1] float32), as `fp8.quantize_rowwise`.

    Bit-identical to quantize_rowwise run on a CUDA device; `num_warps` overrides the default picked from K.
    """
    return _launch(x, None, num_warps)


def silu_and_mul_quant_fp8(x: torch.Tensor, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2K] = [gate | up] -> per_token_quant_fp8(silu(gate) * up), in one pass that never writes the product."""
    return gated_quant_fp8(x, "silu", num_warps=num_warps)


def gated_quant_fp8(x: torch.Tensor, activation: str, *, num_warps: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2K] = [gate | up] -> per_token_quant_fp8(act(gate) * up) for a layers.activation.GATED_ACTIVATIONS
    name, in one pass."""
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"activation {activation!r} has no fused kernel; known: {', '.join(_ACTIVATION_CODES)}")
    return _launch(x, activation, num_warps)


def _launch(x: torch.Tensor, activation: str | None, num_warps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    gated = activation is not None
    if x.dim() != 2:
        raise ValueError(f"expected x of shape [M, K], got {tuple(x.shape)}")
    if gated and x.shape[1] % 2:
        raise ValueError(f"expected [gate | up] rows of even width, got {tuple(x.shape)}")
    m, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if x.stride(1) != 1:
        x = x.contiguous()
    whole_row = k <= _WHOLE_ROW_MAX
    block_k = triton.next_power_of_2(k) if whole_row else _CHUNK
    if num_warps is None:
        # 32 to 64 fp32 values of x per thread (of gate and of up when gated)
        num_warps = (8 if block_k >= 8192 else 4) * (2 if gated else 1)
    _per_token_quant_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k, WHOLE_ROW=whole_row,
                                  ACTIVATION=_ACTIVATION_CODES.get(activation, 0), FP8_MAX=FP8_MAX,
                                  ZERO_ROW_SCALE=_ZERO_ROW_SCALE, num_warps=num_warps)
    return q, scale
