"""Grouped GEMMs for the experts of MoE layers: every routed copy of a row multiplied by its expert, in one launch.

The design is vLLM's fused_moe (read, not copied): the T*k routed copies of a step's T rows are sorted by expert and
each expert's run is padded to a multiple of BLOCK_M, so a program multiplies BLOCK_M copies by one expert's weight
tile; A rows are gathered by copy id inside the kernel (no permuted copy of the activations) and C rows are written
by copy id. All shapes are fixed by (T, k, E, BLOCK_M), not by the routing, so decode steps replay CUDA graphs.

Two precisions: 16-bit operands, or FP8 E4M3 with per-row activation scales (per token for the gate/up GEMM, per
copy for down) and per-output-channel weight scales, applied to the float32 accumulator as torch._scaled_mm does.
The routing weight multiplies the down GEMM's accumulator; the k copies of a row are summed afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy ids (row * k + slot) sorted by expert, each expert's run padded to a multiple of block_m with the
    sentinel T*k; the expert of each block of block_m; and the padded length in use, as a 1-element tensor.

    The buffers have the size of the worst case (every expert padded), so nothing depends on the routing."""
    flat = topk_ids.flatten().to(torch.int64)
    copies = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    first_of_expert = counts.cumsum(0) - counts  # where each expert's copies begin in `order`
    destination = (ends - padded)[sorted_experts] + torch.arange(copies, device=flat.device) \
        - first_of_expert[sorted_experts]
    capacity = -(-(copies + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((capacity,), copies, dtype=torch.int32, device=flat.device)
    sorted_ids[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    # blocks past the padded end get expert E-1; the kernel skips them
    block_experts = torch.searchsorted(ends, block_starts, right=True).clamp(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_experts, ends[-1:].to(torch.int32)


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, weight_ptr,
                         sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
                         N, K, num_copies, a_rows_per_copy_divisor,
                         stride_am, stride_be, stride_bn, stride_cm, stride_bse,
                         FP8: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n_blocks, pid % num_n_blocks
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    copy_ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = copy_ids < num_copies
    a_rows = copy_ids // a_rows_per_copy_divisor  # k for the gate/up GEMM (one A row per token), 1 for down
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_tile = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = offs_k + k < K
        a = tl.load(a_tile + k, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_tile + k, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    if FP8:
        a_scale = tl.load(a_scale_ptr + a_rows, mask=valid, other=0.0)
        b_scale = tl.load(b_scale_ptr + expert * stride_bse + offs_n, mask=offs_n < N, other=0.0)
        acc = acc * a_scale[:, None] * b_scale[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + copy_ids, mask=valid, other=0.0)[:, None]
    c = c_ptr + copy_ids[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, routing: tuple, top_k_per_a_row: int,
                 block_m: int, a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[c] = a[c // top_k_per_a_row] @ b[expert(c)].T for every routed copy c (rows of `out` by copy id).

    a [rows, K] (16-bit, or FP8 with a_scale [rows, 1]), b [E, N, K] (the same, with b_scale [E, N, 1]), out
    [copies, N]; `routing` is align_by_expert's result for this block_m; `weights` [copies] scales each copy's row."""
    sorted_ids, block_experts, num_padded = routing
    num_experts, n, k = b.shape
    if a.shape[1] != k or a.stride(1) != 1 or b.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError(f"grouped_gemm: a {tuple(a.shape)} and b {tuple(b.shape)} must share K with contiguous "
                         f"rows, and out {tuple(out.shape)} must have contiguous rows")
    fp8 = a_scale is not None
    block_n, block_k = (64, 128) if fp8 else (64, 64)
    grid = (sorted_ids.numel() // block_m * triton.cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, b, out, a_scale if fp8 else a, b_scale if fp8 else b, weights if weights is not None else out,
        sorted_ids, block_experts, num_padded, n, k, out.shape[0], top_k_per_a_row,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0), b_scale.stride(0) if fp8 else 0,
        FP8=fp8, MUL_WEIGHT=weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=3)
    return out


def block_m_for(copies: int, num_experts: int) -> int:
    """Rows per program: small when each expert gets a few copies (decode), larger for prefill's long runs."""
    per_expert = copies / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, activation: str = "silu",
                  intermediate_is_parallel: bool = False) -> torch.Tensor:
    """sum_j topk_weights[:, j] * down_e(act(gate_e x) * up_e x), e = topk_ids[:, j], for x [T, H]; act by its
    layers.activation.GATED_ACTIVATIONS name.

    16-bit experts: w13 [E, 2I, H] and w2 [E, H, I] in x's dtype. FP8 experts: E4M3 weights with their per-channel
    scales; x is quantized per token, and the activation-and-multiply output per copy in the kernel that forms it,
    or, where I is one tensor-parallel rank's part (intermediate_is_parallel), with the whole row's scale
    (all-reduced)."""
    from mixquant.kernels.quant import gated_quant_fp8, per_token_quant_fp8
    from mixquant.layers.activation import GATED_ACTIVATIONS
    from mixquant.quantization.fp8 import quantize_rowwise
    from mixquant.quantization.linear_methods import row_amax

    tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    copies = tokens * top_k
    block_m = block_m_for(copies, num_experts)
    routing = align_by_expert(topk_ids, num_experts, block_m)
    gate_up = torch.empty(copies, two_inter, dtype=x.dtype, device=x.device)
    down = torch.empty(copies, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.flatten().float()
    if w13_scale is None:
        grouped_gemm(x, w13, gate_up, routing, top_k, block_m)
        grouped_gemm(GATED_ACTIVATIONS[activation](gate_up), w2, down, routing, 1, block_m, weights=weights)
    else:
        xq, x_scale = per_token_quant_fp8(x)
        grouped_gemm(xq, w13, gate_up, routing, top_k, block_m, x_scale, w13_scale)
        if intermediate_is_parallel:
            h = GATED_ACTIVATIONS[activation](gate_up)
            hq, h_scale = quantize_rowwise(h, row_amax(h, True))
        else:
            hq, h_scale = gated_quant_fp8(gate_up, activation)
        grouped_gemm(hq, w2, down, routing, 1, block_m, h_scale, w2_scale, weights)
    result = down.view(tokens, top_k, hidden).sum(dim=1)
    return result if out is None else out.copy_(result)
