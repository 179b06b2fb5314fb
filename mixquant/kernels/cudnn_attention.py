"""Causal prefill attention with FP8 operands through cuDNN's fused flash attention (cudnn-frontend's sdpa_fp8).

The Triton kernel in `fp8_attention.py` scales per (head, tile) and sums every PV tile in FP32 on the CUDA cores;
on Hopper that design only matches BF16 SDPA's speed. cuDNN's FP8 flash attention overlaps its softmax with the
tensor cores as Triton 3.6 cannot, at the price of cuDNN's scaling contract: **one scale per tensor**.
- Q, K and V: E4M3 with scale amax(|x|) / 448 over the whole tensor (the arithmetic of `quantize_rowwise` on
  CUDA, over all rows at once: `quantize_tensor_fp8`), handed to cuDNN as its descale factors.
- P: cuDNN multiplies the unnormalised softmax (in [0, 1], its row maximum 1) by scale_s = 448 before the cast,
  so the largest weight of each row lands on E4M3's largest value; descale_s = 1/448 undoes it.
- O: E4M3 as well (cuDNN 9.19 writes 16-bit outputs of FP8 attention on Blackwell only), scaled by 1 / V's scale:
  each output row is a convex combination of V's rows, so |O| <= amax(|V|) and 448 / amax(|V|) cannot overflow;
  `_dequantize_kernel` turns it back into the model's dtype (the FP8 linear layer after it quantizes per row).

cuDNN builds one execution plan per shape, which takes time, so a graph is built once per padded length
(`padded_tokens`: at most 1/8 padding) and the true length goes in as the sequence length of a padding mask; the
padded rows are zero and masked. Needs `pip install mixquant[cudnn]` and a GPU of compute capability >= 9.0
(`config.fp8_cudnn_unavailable_reason` says what is missing). On Hopper cuDNN offers FP8 attention with a causal
mask aligned top-left only, so segments after a cached prefix cannot take it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from mixquant.kernels.fp8_attention import check_prefill_inputs
from mixquant.kernels.quant import _quantize, _row_scale
from mixquant.quantization.fp8 import _ZERO_ROW_SCALE, FP8_DTYPE, FP8_MAX

_TILE_ROWS, _TILE_COLS = 16, 1024


def padded_tokens(tokens: int) -> int:
    """The length a graph is built for: a multiple of 128 up to 1,024 tokens, then of 1/16 to 1/8 of the length."""
    step = 128 if tokens <= 1024 else 1 << (tokens.bit_length() - 4)
    return -(-tokens // step) * step


# ---- per-tensor quantization -------------------------------------------------------------------------------


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, T, W, stride_x, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < T) & (cols[None, :] < W)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(x.to(tl.float32))))


@triton.jit
def _quantize_tensor_kernel(x_ptr, out_ptr, amax_ptr, scale_ptr, T, T_PAD, W, stride_x,
                            BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
                            FP8_MAX: tl.constexpr, ZERO_ROW_SCALE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    scale = _row_scale(tl.load(amax_ptr), FP8_MAX, ZERO_ROW_SCALE)
    # rows from T to T_PAD are the padding: written as 0 (finite; the padding mask keeps them out of every row)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                mask=(rows[:, None] < T) & (cols[None, :] < W), other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * W + cols[None, :], _quantize(x, scale, FP8_MAX),
             mask=(rows[:, None] < T_PAD) & (cols[None, :] < W))
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, scale)


def quantize_tensor_fp8(x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] (rows of H * D contiguous values) -> (x8 [rows, H, D] float8_e4m3fn, scale [1] float32).

    One scale for the whole tensor, amax / 448 computed as `quantize_rowwise` computes a row's on CUDA; x8 has
    `rows` >= T rows (default T), those past T zero."""
    tokens, heads, head_dim = x.shape
    rows = tokens if rows is None else rows
    if rows < tokens:
        raise ValueError(f"rows={rows} is fewer than the tensor's {tokens}")
    if x.stride(2) != 1 or x.stride(1) != head_dim:
        x = x.contiguous()
    width = heads * head_dim
    x8 = torch.empty((rows, heads, head_dim), dtype=FP8_DTYPE, device=x.device)
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    cols = triton.cdiv(width, _TILE_COLS)
    if tokens:
        _amax_kernel[(triton.cdiv(tokens, _TILE_ROWS), cols)](x, amax, tokens, width, x.stride(0),
                                                              BLOCK_T=_TILE_ROWS, BLOCK_W=_TILE_COLS, num_warps=8)
    _quantize_tensor_kernel[(triton.cdiv(max(rows, 1), _TILE_ROWS), cols)](
        x, x8, amax, scale, tokens, rows, width, x.stride(0), BLOCK_T=_TILE_ROWS, BLOCK_W=_TILE_COLS,
        FP8_MAX=FP8_MAX, ZERO_ROW_SCALE=_ZERO_ROW_SCALE, num_warps=8)
    return x8, scale


@triton.jit
def _dequantize_kernel(x8_ptr, scale_ptr, out_ptr, T, W, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offsets = rows[:, None].to(tl.int64) * W + cols[None, :]
    mask = (rows[:, None] < T) & (cols[None, :] < W)
    x = tl.load(x8_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_tensor_fp8(x8: torch.Tensor, scale: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `tokens` rows of x8 [rows, H, D] (contiguous) times the scalar `scale`, in `dtype`."""
    width = x8.shape[1] * x8.shape[2]
    out = torch.empty((tokens, *x8.shape[1:]), dtype=dtype, device=x8.device)
    if tokens:
        _dequantize_kernel[(triton.cdiv(tokens, _TILE_ROWS), triton.cdiv(width, _TILE_COLS))](
            x8, scale, out, tokens, width, BLOCK_T=_TILE_ROWS, BLOCK_W=_TILE_COLS, num_warps=8)
    return out


# ---- the cuDNN graph ---------------------------------------------------------------------------------------

_Q, _K, _V, _O, _DESCALE_Q, _DESCALE_K, _DESCALE_V, _DESCALE_S, _SCALE_S, _SCALE_O, _SEQ_LEN, _AMAX_S, _AMAX_O = \
    range(1, 14)


@dataclass
class _Plan:
    graph: object
    handle: object
    workspace: torch.Tensor
    constants: dict[int, torch.Tensor]  # descale_s, scale_s and the two amax outputs cuDNN writes


@lru_cache(maxsize=None)
def _handle(device_index: int):
    import cudnn

    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@lru_cache(maxsize=None)
def _plan(tokens: int, q_heads: int, kv_heads: int, head_dim: int, scale: float, device_index: int) -> _Plan:
    import cudnn

    handle = _handle(device_index)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def tokens_first(heads: int, uid: int, name: str):
        # [batch 1, heads, tokens, dim] over memory laid out [tokens, heads, dim], as the engine's rows are
        return graph.tensor(name=name, uid=uid, dim=[1, heads, tokens, head_dim],
                            stride=[tokens * heads * head_dim, head_dim, heads * head_dim, 1],
                            data_type=cudnn.data_type.FP8_E4M3)

    def scalar(uid: int, name: str, data_type=cudnn.data_type.FLOAT):
        return graph.tensor(name=name, uid=uid, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=data_type)

    seq_len = scalar(_SEQ_LEN, "seq_len", cudnn.data_type.INT32)
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=tokens_first(q_heads, _Q, "q"), k=tokens_first(kv_heads, _K, "k"), v=tokens_first(kv_heads, _V, "v"),
        descale_q=scalar(_DESCALE_Q, "descale_q"), descale_k=scalar(_DESCALE_K, "descale_k"),
        descale_v=scalar(_DESCALE_V, "descale_v"), descale_s=scalar(_DESCALE_S, "descale_s"),
        scale_s=scalar(_SCALE_S, "scale_s"), scale_o=scalar(_SCALE_O, "scale_o"),
        is_inference=True, attn_scale=scale, use_causal_mask=True,
        use_padding_mask=True, seq_len_q=seq_len, seq_len_kv=seq_len, name="prefill")
    o.set_output(True).set_uid(_O).set_dim([1, q_heads, tokens, head_dim]).set_stride(
        [tokens * q_heads * head_dim, head_dim, q_heads * head_dim, 1]).set_data_type(cudnn.data_type.FP8_E4M3)
    for uid, amax in ((_AMAX_S, amax_s), (_AMAX_O, amax_o)):
        amax.set_output(True).set_uid(uid).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
            cudnn.data_type.FLOAT)
    graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    device = torch.device("cuda", device_index)

    def constant(value: float) -> torch.Tensor:
        return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)

    constants = {_DESCALE_S: constant(1 / FP8_MAX), _SCALE_S: constant(FP8_MAX), _AMAX_S: constant(0.0),
                 _AMAX_O: constant(0.0)}
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
    return _Plan(graph, handle, workspace, constants)


def cudnn_fp8_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v of one sequence's fresh tokens, FP8 operands in cuDNN; returns [T, q_heads, D].

    q [T, q_heads, D], k and v [T, kv_heads, D], one 16-bit dtype; query head h reads KV head
    h // (q_heads // kv_heads); query i attends to keys 0..i.
    """
    check_prefill_inputs(q, k, v)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 0:
        return torch.empty_like(q)
    import cudnn

    rows = padded_tokens(tokens)
    plan = _plan(rows, q_heads, kv_heads, head_dim, float(scale), q.device.index)
    (q8, q_scale), (k8, k_scale), (v8, v_scale) = (quantize_tensor_fp8(x, rows) for x in (q, k, v))
    o8 = torch.empty((rows, q_heads, head_dim), dtype=FP8_DTYPE, device=q.device)
    seq_len = torch.full((1, 1, 1, 1), tokens, dtype=torch.int32, device=q.device)
    cudnn.set_stream(handle=plan.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    plan.graph.execute({_Q: q8, _K: k8, _V: v8, _O: o8, _DESCALE_Q: q_scale, _DESCALE_K: k_scale,
                        _DESCALE_V: v_scale, _SCALE_O: v_scale.reciprocal(), _SEQ_LEN: seq_len, **plan.constants},
                       plan.workspace, handle=plan.handle)
    return dequantize_tensor_fp8(o8, v_scale, tokens, q.dtype)


def cudnn_fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same scaling contract in float32 PyTorch: per-tensor E4M3 q, k, v and O (O's scale V's); P * 448 rounded
    to E4M3.

    P is taken relative to each row's maximum over all its keys; cuDNN's online softmax takes it relative to the
    running maximum, so a few roundings of P differ: the GPU check allows for that."""
    tokens, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]

    def tensor_scale(x):
        scale_x = x.float().abs().amax() * torch.tensor(1 / FP8_MAX, dtype=torch.float32, device=x.device)
        return torch.where(scale_x == 0, _ZERO_ROW_SCALE, scale_x)

    def rounded(x, scale_x):
        return (x.float() / scale_x).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale_x

    v_scale = tensor_scale(v)
    qf = rounded(q, tensor_scale(q)).transpose(0, 1)
    kf = rounded(k, tensor_scale(k)).repeat_interleave(group, 1).transpose(0, 1)
    vf = rounded(v, v_scale).repeat_interleave(group, 1).transpose(0, 1)
    scores = (qf @ kf.transpose(1, 2)) * scale
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p8 = (p * FP8_MAX).to(FP8_DTYPE).float() / FP8_MAX
    return rounded((p8 @ vf) / p.sum(-1, keepdim=True), v_scale).transpose(0, 1).to(q.dtype)
