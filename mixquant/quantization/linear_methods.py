"""How one linear layer computes in one precision: quantization as a module swap (gpt-fast's idea).

Each method is built either from the model-dtype weight (quantized at load) or from a pre-quantized
compressed-tensors checkpoint, and runs natively where the GPU has the tensor cores for it, or as exact
emulation (same quantized operands and scales, same fp32 epilogue) where it does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixquant.distributed.parallel_state import all_reduce_max
from mixquant.layers.activation import GATED_ACTIVATIONS
from mixquant.quantization import fp8, nvfp4


class LinearMethod:
    precision: str
    mode: str  # "native" | "emulated"
    uses_model_weight: bool = False
    takes_quantized_rows: bool = False  # accepts x as fp8.QuantizedRows (its producer quantized it)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, activation: str | None = None
                 ) -> torch.Tensor:
        """x @ W^T (+ bias); written into `out` when given (rows of a larger output). activation: x is a gated MLP's
        [gate | up] and the layer's input is act(gate) * up (layers.activation.GATED_ACTIVATIONS), which a method
        that quantizes its input may fuse."""
        return self.apply(GATED_ACTIVATIONS[activation](x) if activation else x, out)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.precision}({self.mode})"


def row_amax(x: torch.Tensor, input_is_parallel: bool) -> torch.Tensor:
    """The largest |x| of each row, float32 [..., 1]. input_is_parallel: each tensor-parallel rank holds part of every
    row (a row-parallel layer's input), and the max is taken over the whole row, so that a rank quantizes its part
    exactly as the unsplit layer quantizes it."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    return all_reduce_max(amax) if input_is_parallel else amax


class BF16Method(LinearMethod):
    """Unquantized, in the engine's dtype (bf16 on GPU; float32 on CPU for exact reference checks)."""

    precision, mode, uses_model_weight = "bf16", "native", True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def apply(self, x, out):
        if out is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)


class NoDecodeMethod(LinearMethod):
    """The decode side of an engine that only prefills for a decode instance (kv_role kv_producer): it keeps no
    weights for decode rows, and the scheduler never gives it any."""

    precision, mode = "none", "none"

    def __call__(self, *args, **kwargs):  # a linear layer's or the experts' decode rows alike
        raise RuntimeError("this engine only prefills (kv_role kv_producer) and has no decode weights")


class FP8Method(LinearMethod):
    """W8A8 E4M3: per-output-channel weight scales, dynamic per-token activation scales.

    input_is_parallel (a row-parallel layer's rank): weights and activations hold part of each row; both scales
    come from the whole row's amax, all-reduced over the ranks ([rows, 1] each), so each rank quantizes exactly as
    one device does."""

    precision = "fp8"

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, native: bool,
                 input_is_parallel: bool = False):
        self.qweight, self.weight_scale, self.bias = qweight, weight_scale.float().reshape(-1, 1), bias
        self.mode = "native" if native else "emulated"
        self.input_is_parallel = input_is_parallel
        self.takes_quantized_rows = native and not input_is_parallel
        if native and (qweight.shape[0] % 16 or qweight.shape[1] % 16):
            raise ValueError(f"FP8 GEMMs need both weight dims divisible by 16, got {tuple(qweight.shape)}")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, native: bool,
                    input_is_parallel: bool = False) -> FP8Method:
        qweight, scale = fp8.quantize_rowwise(weight, row_amax(weight, input_is_parallel))
        return cls(qweight, scale, bias, native, input_is_parallel)

    def __call__(self, x, out=None, activation=None):
        if self.mode != "native":
            return super().__call__(x, out, activation)
        # one Triton pass per token, with the MLP's gating in it where there is one (the eager abs/amax/div/clamp/
        # cast chain cost more than FP8 GEMMs saved)
        from mixquant.kernels.quant import gated_quant_fp8, per_token_quant_fp8

        if isinstance(x, fp8.QuantizedRows):
            xq, x_scale = x.data, x.scale
        elif self.input_is_parallel:  # the fused kernels see this rank's part of each row only
            x = GATED_ACTIVATIONS[activation](x) if activation else x
            xq, x_scale = fp8.quantize_rowwise(x, row_amax(x, True))
        else:
            xq, x_scale = gated_quant_fp8(x, activation) if activation else per_token_quant_fp8(x)
        kwargs = {} if out is None else {"out": out}
        return torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                                bias=self.bias, out_dtype=x.dtype, **kwargs)

    def apply(self, x, out):
        xq, x_scale = fp8.quantize_rowwise(x, row_amax(x, self.input_is_parallel))
        result = fp8.scaled_mm_reference(xq, x_scale, self.qweight, self.weight_scale, x.dtype)
        result = result if self.bias is None else result + self.bias
        return result if out is None else out.copy_(result)


@dataclass
class ActivationGroup:
    """Output columns [start, end) whose input is quantized with one activation global scale (None: per token)."""

    start: int
    end: int
    input_global_scale: torch.Tensor | None


class NVFP4Method(LinearMethod):
    """W4A4 NVFP4 with compressed-tensors semantics.

    Weight global scales are kept per output row, so fused shards (q/k/v, gate/up) that carry their own global
    scales stay exact: alpha = 1 / (gs_x * gs_w) is applied per row and column in the fp32 epilogue. Without a
    calibrated input global scale, activations get a dynamic per-token one, which keeps every row independent of
    the others in its batch. Weight-only checkpoints (NVFP4A16) keep activations in the model dtype.

    Under tensor parallelism a rank holds whole 16-element blocks only (the loader checks), so block scales are
    local; the global scales are not: a weight shard's comes from its amax over all ranks (or the checkpoint), and
    with input_is_parallel (a row-parallel layer) the dynamic per-token one from the whole row's amax, all-reduced.
    """

    precision = "nvfp4"

    def __init__(self, packed: torch.Tensor, block_scale: torch.Tensor, weight_global_scale: torch.Tensor,
                 groups: list[ActivationGroup], bias: torch.Tensor | None, native: bool, compute_dtype: torch.dtype,
                 quantize_activations: bool = True, input_is_parallel: bool = False):
        self.packed, self.block_scale = packed, block_scale
        self.quantize_activations, self.input_is_parallel = quantize_activations, input_is_parallel
        native = native and quantize_activations  # FP4 tensor cores take FP4 operands on both sides
        self.weight_global_scale = weight_global_scale.float().reshape(-1, 1)  # [N, 1]
        self.groups, self.bias, self.compute_dtype = groups, bias, compute_dtype
        self.mode = "native" if native else "emulated"
        if self.mode == "emulated":
            # e2m1 * e4m3 is exact in bf16, so the emulated GEMM can run on the tensor cores without rounding the
            # operands; the weight side is dequantized once.
            self.weight_unscaled = nvfp4.dequantize_unscaled(packed, block_scale, compute_dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, shard_sizes: list[int], bias: torch.Tensor | None, native: bool,
                    compute_dtype: torch.dtype, input_is_parallel: bool = False) -> NVFP4Method:
        """shard_sizes: the rank's rows of each checkpoint shard; each shard's global scale is its whole amax (all
        ranks' parts of it)."""
        amax = all_reduce_max(torch.stack([s.abs().amax() for s in torch.split(weight, shard_sizes)]).float())
        row_scales = torch.cat([nvfp4.global_scale_from_amax(a).reshape(1, 1).expand(n, 1)
                                for a, n in zip(amax, shard_sizes)])
        packed, block_scale = nvfp4.quantize(weight, row_scales)
        groups = [ActivationGroup(0, weight.shape[0], None)]
        return cls(packed, block_scale, row_scales, groups, bias, native, compute_dtype,
                   input_is_parallel=input_is_parallel)

    def apply(self, x, out):
        outs = [self._group_mm(x, g) for g in self.groups]
        result = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            result = result + self.bias.float()
        return result.to(x.dtype) if out is None else out.copy_(result)

    def _group_mm(self, x: torch.Tensor, group: ActivationGroup) -> torch.Tensor:
        w_gs = self.weight_global_scale[group.start:group.end]
        if not self.quantize_activations:
            acc = _mm_fp32(x.to(self.compute_dtype), self.weight_unscaled[group.start:group.end].t())
            return acc / w_gs.t()
        if group.input_global_scale is None:
            x_gs = nvfp4.global_scale_from_amax(row_amax(x, self.input_is_parallel))  # [M, 1]
        else:
            x_gs = group.input_global_scale.float().reshape(1, 1)
        x_packed, x_block_scale = nvfp4.quantize(x, x_gs)
        alpha = 1.0 / (x_gs * w_gs.t())  # [M or 1, N]
        if self.mode == "native":
            acc = _fp4_scaled_mm(x_packed, x_block_scale, self.packed[group.start:group.end],
                                 self.block_scale[group.start:group.end])
        else:
            x_hat = nvfp4.dequantize_unscaled(x_packed, x_block_scale, self.compute_dtype)
            acc = _mm_fp32(x_hat, self.weight_unscaled[group.start:group.end].t())
        return acc * alpha


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32; 16-bit operands stay on the tensor cores."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return a.float() @ b.float()


def _fp4_scaled_mm(x_packed, x_block_scale, w_packed, w_block_scale) -> torch.Tensor:
    """Blackwell FP4 tensor-core GEMM through PyTorch's scaled matmul (cuBLASLt, block scales swizzled 128x4).

    Written against the documented API; not verified on Blackwell hardware, which this project has not had.
    """
    m, n = x_packed.shape[0], w_packed.shape[0]
    a = x_packed.view(torch.float4_e2m1fn_x2)
    b = w_packed.view(torch.float4_e2m1fn_x2).t()
    out = torch._scaled_mm(a, b, scale_a=nvfp4.swizzle_block_scale(x_block_scale),
                           scale_b=nvfp4.swizzle_block_scale(w_block_scale), out_dtype=torch.float32)
    return out[:m, :n]
