"""How a layer's experts compute in one precision: the MoE twin of linear_methods.

Experts are stored stacked: w13 [E, 2I, H] (each expert's gate rows, then its up rows) and w2 [E, H, I]. A method
keeps its operands stacked too, which is what the grouped GEMM kernel (kernels/fused_moe.py) reads, and one
LinearMethod per expert and projection as views of them, so that an expert computes exactly what a Linear of the
same precision computes (same activation quantization, same float32 epilogue). Rows are routed to experts by the
caller; every method returns sum_j topk_weights[r, j] * expert_{topk_ids[r, j]}(x[r]).

intermediate_is_parallel: the experts hold one tensor-parallel rank's part of the intermediate dim (w13's rows,
w2's columns); the down projections then quantize as row-parallel linears do (whole-row statistics), and each
method returns the rank's partial sum, which GroupedExperts all-reduces.
"""
from __future__ import annotations

import torch

from mixquant.quantization import fp8
from mixquant.quantization.linear_methods import BF16Method, FP8Method, LinearMethod, NVFP4Method, row_amax


class ExpertsMethod:
    precision: str
    mode: str  # "native" | "emulated"
    uses_model_weight: bool = False
    gate_up: list[LinearMethod]
    down: list[LinearMethod]

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 out: torch.Tensor | None = None, activation: str = "silu") -> torch.Tensor:
        """activation: the experts' gate activation (layers.activation.GATED_ACTIVATIONS)."""
        return combine_experts(x, topk_weights, topk_ids, self.gate_up, self.down, out, activation)

    def __repr__(self) -> str:
        return f"{self.precision}({self.mode}, {len(self.gate_up)} experts)"


def combine_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    gate_up: list[LinearMethod], down: list[LinearMethod], out: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    """The reference path, one expert after another over the rows routed to it (as transformers computes it, so
    float32 runs match it): any device, any method, but shapes that follow the routing, so no CUDA graph."""
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(gate_up)).tolist()
    rows = order // topk_ids.shape[1]
    weights = topk_weights.flatten()[order, None]
    result = torch.zeros_like(x) if out is None else out.zero_()
    start = 0
    for expert, n in enumerate(counts):
        if n:
            picked = slice(start, start + n)
            y = down[expert](gate_up[expert](x[rows[picked]]), activation=activation)
            result.index_add_(0, rows[picked], (y * weights[picked]).to(result.dtype))
        start += n
    return result


class BF16Experts(ExpertsMethod):
    """In the model dtype; on a GPU through the grouped GEMM kernel (fixed shapes: decode steps replay CUDA graphs)."""

    precision, mode, uses_model_weight = "bf16", "native", True

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.gate_up = [BF16Method(w, None) for w in w13]
        self.down = [BF16Method(w, None) for w in w2]

    def __call__(self, x, topk_weights, topk_ids, out=None, activation="silu"):
        if x.is_cuda:
            from mixquant.kernels.fused_moe import fused_experts

            return fused_experts(x, self.w13, self.w2, topk_weights, topk_ids, out=out, activation=activation)
        return super().__call__(x, topk_weights, topk_ids, out, activation)


class FP8Experts(ExpertsMethod):
    """W8A8 E4M3 as FP8Method: per-output-channel weight scales [E, N, 1], dynamic per-token activation scales."""

    precision = "fp8"

    def __init__(self, q13: torch.Tensor, s13: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, native: bool,
                 intermediate_is_parallel: bool = False):
        self.q13, self.s13, self.q2, self.s2 = q13, s13.float(), q2, s2.float()
        self.mode = "native" if native else "emulated"
        self.intermediate_is_parallel = intermediate_is_parallel
        self.gate_up = [FP8Method(q, s, None, native) for q, s in zip(self.q13, self.s13)]
        self.down = [FP8Method(q, s, None, native, intermediate_is_parallel) for q, s in zip(self.q2, self.s2)]

    @classmethod
    def from_weight(cls, w13: torch.Tensor, w2: torch.Tensor, native: bool,
                    intermediate_is_parallel: bool = False) -> FP8Experts:
        return cls(*fp8.quantize_rowwise(w13), *fp8.quantize_rowwise(w2, row_amax(w2, intermediate_is_parallel)),
                   native, intermediate_is_parallel)

    @classmethod
    def stack(cls, gate_up: list[FP8Method], down: list[FP8Method], native: bool) -> FP8Experts:
        """From one FP8Method per expert and projection (a checkpoint's per-expert tensors)."""
        return cls(torch.stack([m.qweight for m in gate_up]), torch.stack([m.weight_scale for m in gate_up]),
                   torch.stack([m.qweight for m in down]), torch.stack([m.weight_scale for m in down]), native,
                   down[0].input_is_parallel)

    def __call__(self, x, topk_weights, topk_ids, out=None, activation="silu"):
        if self.mode == "native" and x.is_cuda:
            from mixquant.kernels.fused_moe import fused_experts

            return fused_experts(x, self.q13, self.q2, topk_weights, topk_ids, w13_scale=self.s13,
                                 w2_scale=self.s2, out=out, activation=activation,
                                 intermediate_is_parallel=self.intermediate_is_parallel)
        return super().__call__(x, topk_weights, topk_ids, out, activation)


class NVFP4Experts(ExpertsMethod):
    """One NVFP4Method per expert and projection (each with its own global scales, as per-expert checkpoint modules
    carry them). Hopper and CPUs emulate NVFP4 exactly, expert by expert: for accuracy studies, not speed."""

    precision = "nvfp4"

    def __init__(self, gate_up: list[NVFP4Method], down: list[NVFP4Method]):
        self.gate_up, self.down = gate_up, down
        self.mode = gate_up[0].mode

    @classmethod
    def from_weight(cls, w13: torch.Tensor, w2: torch.Tensor, native: bool, compute_dtype: torch.dtype,
                    intermediate_is_parallel: bool = False) -> NVFP4Experts:
        half = w13.shape[1] // 2
        return cls([NVFP4Method.from_weight(w, [half, half], None, native, compute_dtype) for w in w13],
                   [NVFP4Method.from_weight(w, [w.shape[0]], None, native, compute_dtype, intermediate_is_parallel)
                    for w in w2])
