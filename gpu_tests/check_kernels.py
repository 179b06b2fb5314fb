"""GPU check of mixquant.kernels on an H100 (run through the device tool; CI checks them under the interpreter).

1. Correctness on fresh random data, outputs poisoned first:
   - paged_decode_attention against a float64 gather-and-softmax reference on the Qwen3-8B attention shape
     (32 query heads, 8 KV heads, head_dim 128, bf16) for B in {1, 8, 64} and contexts up to 32768, rows of mixed
     lengths, padded tables pointing at NaN blocks and NaN in every slot past a row's length;
   - one CUDA graph of it at B=8, replayed with new context_lens / block_tables contents, against eager;
   - per_token_quant_fp8 bit-identical to fp8.quantize_rowwise (bytes and scales), plus zero, NaN, tiny and
     huge rows and the chunked path for rows longer than 16384;
   - silu_and_mul_quant_fp8 against quantize_rowwise of the engine's unfused (compiled) silu_and_mul;
   - the QK-norm + RoPE kernel (mixquant.kernels.rotary, as apply_rotary runs it) within rounding of its eager ops,
     on q/k views of a fused qkv output as in the engine.
2. Timings (triton.testing.do_bench medians of CUDA-graph replays, inputs rotated past L2): paged decode against
   the SDPA-gather path it replaces (TorchAttentionBackend._decode) and a device-to-device copy;
   per_token_quant_fp8 against eager quantize_rowwise; silu_and_mul_quant_fp8 against silu_and_mul followed by
   per_token_quant_fp8, and silu_and_mul alone; the QK-norm + RoPE kernel against the same chain compiled
   into one function, and the four passes before that (two compiled norms, an eager gather, a compiled rotation);
   a small sweep of launch shapes for tuning.
3. fp8_prefill_attention (causal, Qwen3-8B heads): against BF16 SDPA (causal, enable_gqa) at 4k and 32k tokens,
   against float64 on sampled rows and against its PyTorch emulation at 4k; needle retrieval at 32k and 131072
   tokens (one key made to match one query: that query's output must be the key's value, as with SDPA); then
   do_bench medians against SDPA at 4k-128k in TFLOP/s, and a sweep of tile shapes at 32k. About a minute.

Usage: PYTHONPATH=. python3 gpu_tests/check_kernels.py [--only fp8-prefill|gated-quant|norm-rope|norm-quant] [--fp8-tile 128x128x8x3]
(writes $OUT/kernels.json when OUT is set; exit 1 on a failed check; --fp8-tile: the launch shape of section 3)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mixquant.kernels.cudnn_attention import (cudnn_fp8_attention_reference, cudnn_fp8_prefill_attention,
                                              padded_tokens, quantize_tensor_fp8)
from mixquant.kernels.fp8_attention import (PrefillConfig, fp8_attention_reference, fp8_prefill_attention,
                                            quantize_blocks_fp8)
from mixquant.kernels.paged_attention import DecodeConfig, default_num_splits, paged_decode_attention
from mixquant.kernels.quant import per_token_quant_fp8, rms_norm_quant_fp8, silu_and_mul_quant_fp8
from mixquant.layers.activation import silu_and_mul
from mixquant.layers.layernorm import add_rms_norm, rms_norm
from mixquant.layers.rotary_embedding import _apply as rotate_half
from mixquant.layers.rotary_embedding import apply_rotary, rotate_eager
from mixquant.quantization.fp8 import quantize_rowwise
from mixquant.utils.compile import fused_on_gpu

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Qwen3-8B attention, the engine's block size
SCALE = HEAD_DIM ** -0.5
DEV = torch.device("cuda")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---- paged decode attention -----------------------------------------------------------------------------------


def paged_inputs(lengths: list[int], seed: int, pad_blocks: int = 3, poison: bool = True):
    """q, caches and int32 tables for rows of the given lengths; rows own shuffled, disjoint blocks.

    With `poison`, every cache slot that no row's valid position maps to is NaN (the tail of each last block and
    three spare blocks), and each table's padding points at the spare blocks.
    """
    g = torch.Generator(device=DEV).manual_seed(seed)
    needed = [math.ceil(n / BLOCK_SIZE) for n in lengths]
    spare = 3
    num_blocks = sum(needed) + spare
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=g, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=g, device=DEV, dtype=torch.bfloat16)
    order = torch.randperm(num_blocks, generator=g, device=DEV)
    spare_ids = order[sum(needed):]
    tables = spare_ids[torch.randint(0, spare, (len(lengths), max(needed) + pad_blocks), generator=g, device=DEV)]
    valid_in_block = torch.zeros(num_blocks, dtype=torch.long, device=DEV)
    first = 0
    for b, (n, length) in enumerate(zip(needed, lengths)):
        blocks = order[first:first + n]
        tables[b, :n] = blocks
        valid_in_block[blocks] = BLOCK_SIZE
        valid_in_block[blocks[-1]] = length - (n - 1) * BLOCK_SIZE
        first += n
    if poison:
        stale = torch.arange(BLOCK_SIZE, device=DEV)[None, :] >= valid_in_block[:, None]  # [num_blocks, block_size]
        k_cache[stale] = float("nan")
        v_cache[stale] = float("nan")
    q = torch.randn(len(lengths), HEADS, HEAD_DIM, generator=g, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, tables.to(torch.int32), lens


def sdpa_gather_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """The SDPA-gather decode path of TorchAttentionBackend._decode (commit 571fa72) that the kernel replaces,
    copied so that the comparison outlives the wiring of the kernel into the backend."""
    max_blocks = block_tables.shape[1]
    k_ctx = k_cache[block_tables].flatten(1, 2).transpose(1, 2)  # [rows, kv_heads, max_len, dim]
    v_ctx = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
    positions = torch.arange(max_blocks * k_cache.shape[1], device=q.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_ctx, v_ctx, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def reference(q, k_cache, v_cache, tables, lens) -> torch.Tensor:
    """Float64 softmax attention of each row over its gathered positions, one row at a time (bounded memory)."""
    group = HEADS // KV_HEADS
    out = torch.empty(q.shape, dtype=torch.float64, device=DEV)
    for b, length in enumerate(lens.tolist()):
        blocks = tables[b, :math.ceil(length / BLOCK_SIZE)].long()
        k = k_cache[blocks].flatten(0, 1)[:length].double()  # [length, kv_heads, dim]
        v = v_cache[blocks].flatten(0, 1)[:length].double()
        scores = torch.einsum("kgd,lkd->kgl", q[b].double().view(KV_HEADS, group, HEAD_DIM), k) * SCALE
        out[b] = torch.einsum("kgl,lkd->kgd", scores.softmax(-1), v).reshape(HEADS, HEAD_DIM)
    return out


def mixed_lengths(batch: int, context: int, seed: int) -> list[int]:
    """One row at the full context, the others anywhere in [1, context]."""
    g = torch.Generator().manual_seed(seed)
    return [context] + torch.randint(1, context + 1, (batch - 1,), generator=g).tolist()


def check_attention(batches=(1, 8, 64), contexts=(1, 17, 1000, 8192, 32768)) -> list[dict]:
    results = []
    for batch in batches:
        for context in contexts:
            seed = batch * 100003 + context
            q, k_cache, v_cache, tables, lens = paged_inputs(mixed_lengths(batch, context, seed), seed)
            out = torch.full_like(q, float("nan"))
            paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE, out)
            err = rel_err(out, reference(q, k_cache, v_cache, tables, lens))
            splits = default_num_splits(batch, KV_HEADS, tables.shape[1] * BLOCK_SIZE, DEV)
            ok = bool(torch.isfinite(out).all()) and err < 1e-2
            results.append(dict(batch=batch, context=context, splits=splits, rel_err=err, ok=ok))
            print(f"attention B={batch:3} context={context:6} splits={splits:3} rel_err={err:.2e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
            del q, k_cache, v_cache, tables, lens, out
    return results


def check_graph() -> dict:
    """Capture at B=8 on length-1 rows, replay on new lengths and tables: the graph must track the contents."""
    batch, context = 8, 4096
    q, k_cache, v_cache, tables, lens = paged_inputs([context] * batch, seed=7, poison=False)
    lens.fill_(1)
    out = torch.empty_like(q)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE, out)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE, out)
    results = []
    for seed in (8, 9):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.tensor(mixed_lengths(batch, context, seed), dtype=torch.int32))
        # the same blocks in another order: rows now read each other's former blocks
        tables.copy_(tables[torch.randperm(batch, device=DEV)].flip(1))
        out.fill_(float("nan"))
        graph.replay()
        eager = paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE)
        err = rel_err(out, reference(q, k_cache, v_cache, tables, lens))
        results.append(dict(equal_to_eager=torch.equal(out, eager), rel_err=err))
    ok = all(r["equal_to_eager"] and r["rel_err"] < 1e-2 for r in results)
    print(f"cuda graph B={batch}: replays {results} {'ok' if ok else 'FAIL'}", flush=True)
    return dict(replays=results, ok=ok)


# ---- per-token FP8 quantization --------------------------------------------------------------------------------


def quant_poisoned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """per_token_quant_fp8 with its outputs landing, as far as the caching allocator allows, on poisoned memory.

    The kernel allocates its own outputs: blocks of their exact sizes are filled with NaN bytes and freed just
    before, so that the allocator hands them back; `poisoned` says whether it did.
    """
    m, k = x.shape
    poison_q = torch.full((m, k), 0x7F, dtype=torch.uint8, device=DEV)  # e4m3fn NaN
    poison_s = torch.full((m, 1), float("nan"), dtype=torch.float32, device=DEV)
    pointers = (poison_q.data_ptr(), poison_s.data_ptr())
    del poison_q, poison_s
    q, scale = per_token_quant_fp8(x)
    return q, scale, (q.data_ptr(), scale.data_ptr()) == pointers


def special_rows(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(6, k, generator=g, device=DEV)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2] *= 1e-37  # a subnormal float32 scale
    x[3] *= 1e30
    x[4, :k // 2] = -0.0
    return x


QUANT_CASES = [(m, k, torch.bfloat16) for m in (1, 7, 4096, 8192) for k in (4096, 12288)] + [
    (64, 25600, torch.bfloat16), (300, 4096, torch.float16), (300, 4096, torch.float32)]


def check_quant(cases=QUANT_CASES, special_k: int = 4096) -> list[dict]:
    results = []
    for i, (m, k, dtype) in enumerate([*cases, ("special", special_k, torch.float32)]):
        g = torch.Generator(device=DEV).manual_seed(1000 + i)
        x = special_rows(k, i) if m == "special" else torch.randn(m, k, generator=g, device=DEV, dtype=dtype)
        q_ref, s_ref = quantize_rowwise(x)
        q, s, poisoned = quant_poisoned(x)
        bytes_equal = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        scales_equal = torch.equal(s.view(torch.int32), s_ref.view(torch.int32))  # bitwise: NaN == NaN here
        # which arithmetic torch used for amax / 448 on this device (the kernel assumes the reciprocal multiply)
        amax = x.float().abs().amax(-1, keepdim=True)
        reciprocal_rows = int((s_ref == amax * torch.tensor(1 / 448, device=DEV)).sum())
        ok = bytes_equal and scales_equal
        results.append(dict(m=m, k=k, dtype=str(dtype), bytes_equal=bytes_equal, scales_equal=scales_equal,
                            poisoned=poisoned, ref_scale_is_reciprocal_multiply=f"{reciprocal_rows}/{x.shape[0]}",
                            ok=ok))
        print(f"quant M={m} K={k} {dtype}: bytes_equal={bytes_equal} scales_equal={scales_equal} "
              f"poisoned={poisoned} reciprocal_rows={reciprocal_rows}/{x.shape[0]} {'ok' if ok else 'FAIL'}",
              flush=True)
    return results


GATED_CASES = [(1, 12288), (7, 12288), (2048, 12288), (8192, 12288), (300, 3072), (64, 25600)]
GATED_MAX_DIFFERENT = 1e-4  # fraction of bytes: a rare flip of one bf16 rounding inside the SiLU, if any


def check_gated_quant(cases=GATED_CASES) -> list[dict]:
    """The fused kernel against what the engine computed before it: the compiled silu_and_mul, then quantization."""
    results = []
    for i, (m, k) in enumerate(cases):
        g = torch.Generator(device=DEV).manual_seed(2000 + i)
        x = torch.randn(m, 2 * k, generator=g, device=DEV, dtype=torch.bfloat16) * 2
        q_ref, s_ref = quantize_rowwise(silu_and_mul(x))
        q, s = silu_and_mul_quant_fp8(x)
        different = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
        step_diff = (q.view(torch.uint8).int() - q_ref.view(torch.uint8).int()).abs().max().item()
        scale_diff = ((s - s_ref).abs() / s_ref).max().item()
        ok = different <= GATED_MAX_DIFFERENT and step_diff <= 1 and scale_diff <= 2 ** -7
        results.append(dict(m=m, k=k, bytes_different=different, max_fp8_steps=step_diff,
                            max_scale_rel_diff=scale_diff, ok=ok))
        print(f"gated quant M={m} K={k}: bytes different {different:.1e}, max {step_diff} fp8 step(s), scales "
              f"within {scale_diff:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return results


NORM_QUANT_CASES = [(1, 4096), (7, 4096), (2048, 4096), (8192, 4096), (300, 5120)]
NORM_QUANT_MAX_DIFFERENT = 1e-3  # fraction of bytes: the sum of squares is reduced in another order than inductor's


def norm_quant_inputs(m: int, k: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV, dtype=torch.bfloat16) * 3
    residual = torch.randn(m, k, generator=g, device=DEV, dtype=torch.bfloat16) * 10
    weight = (1 + 0.2 * torch.randn(k, generator=g, device=DEV)).to(torch.bfloat16)
    return x, residual, weight


def check_norm_quant(cases=NORM_QUANT_CASES) -> list[dict]:
    """The fused norm + quantization against what the engine computed before it: the compiled add_rms_norm (or
    rms_norm), then quantization; the residual sum must be equal."""
    results = []
    for i, (m, k) in enumerate(cases):
        for with_residual in (True, False):
            x, residual, weight = norm_quant_inputs(m, k, 2500 + i)
            if with_residual:
                normed, summed_ref = add_rms_norm(x, residual, weight, 1e-6)
                q, s, summed = rms_norm_quant_fp8(x, weight, 1e-6, residual)
                summed_equal = torch.equal(summed, summed_ref)
            else:
                normed, summed_equal = rms_norm(x, weight, 1e-6), True
                q, s, _ = rms_norm_quant_fp8(x, weight, 1e-6)
            q_ref, s_ref = quantize_rowwise(normed)
            different = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
            step_diff = (q.view(torch.uint8).int() - q_ref.view(torch.uint8).int()).abs().max().item()
            scale_diff = ((s - s_ref).abs() / s_ref).max().item()
            ok = (summed_equal and different <= NORM_QUANT_MAX_DIFFERENT and step_diff <= 1
                  and scale_diff <= 2 ** -7)
            results.append(dict(m=m, k=k, residual=with_residual, summed_equal=summed_equal,
                                bytes_different=different, max_fp8_steps=step_diff, max_scale_rel_diff=scale_diff,
                                ok=ok))
            print(f"norm quant M={m} K={k} residual={with_residual}: summed equal {summed_equal}, bytes different "
                  f"{different:.1e}, max {step_diff} fp8 step(s), scales within {scale_diff:.1e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return results


def bench_norm_quant(ms=(2048, 8192), k: int = 4096) -> list[dict]:
    """The norm before the QKV / gate-up projections in fp8 prefill: one fused pass against the two it replaces."""
    results = []
    for m in ms:
        sets = [norm_quant_inputs(m, k, 2600 + i) for i in range(math.ceil(ROTATE_BYTES / (m * k * 4)))]
        fused = per_call_ms([partial(rms_norm_quant_fp8, x, w, 1e-6, r) for x, r, w in sets])
        unfused = per_call_ms([lambda x=x, r=r, w=w: per_token_quant_fp8(add_rms_norm(x, r, w, 1e-6)[0])
                               for x, r, w in sets])
        nbytes = m * k * (2 + 2 + 2 + 1) + m * 4  # x and residual in, the sum (bf16) and fp8 + scales out
        results.append(dict(m=m, k=k, fused_ms=fused, fused_gbps=nbytes / fused / 1e6, unfused_ms=unfused,
                            speedup=unfused / fused))
        print(f"norm quant M={m} K={k}: fused {fused * 1e3:.1f} us ({nbytes / fused / 1e6:.0f} GB/s), add_rms_norm + "
              f"quant {unfused * 1e3:.1f} us ({unfused / fused:.2f}x)", flush=True)
        del sets
    return results


def qkv_views(tokens: int, seed: int, max_position: int = 131072):
    """apply_rotary's arguments: q, k views into one fused qkv projection output (strided, as project_qkv hands
    them on), the cos/sin tables, positions, the QK-norm weights and eps."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g, device=DEV, dtype=torch.bfloat16)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    weights = [1 + 0.1 * torch.randn(HEAD_DIM, generator=g, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    angles = torch.outer(torch.arange(max_position, device=DEV, dtype=torch.float),
                         1e6 ** -(torch.arange(0, HEAD_DIM, 2, device=DEV, dtype=torch.float) / HEAD_DIM)).repeat(1, 2)
    positions = torch.randint(0, max_position, (tokens,), generator=g, device=DEV)
    return (q.view(tokens, HEADS, HEAD_DIM), k.view(tokens, KV_HEADS, HEAD_DIM), angles.cos(), angles.sin(),
            positions, *weights, 1e-6)


def unfused_norm_rope(q, k, cos, sin, positions, q_weight, k_weight, eps):
    """The passes the engine made first: two compiled norms, an eager gather, a compiled rotation."""
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return rotate_gathered(q, k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))


@fused_on_gpu
def rotate_gathered(q, k, cos, sin):
    return rotate_half(q, cos, sin), rotate_half(k, cos, sin)


compiled_norm_rope = fused_on_gpu(rotate_eager)  # the same chain compiled into one function (torch.compile)


def check_norm_rope(token_counts=(1, 7, 2048, 8192)) -> list[dict]:
    """The kernel within one bf16 step of a unit-scale value of its eager ops, nearly all elements equal."""
    results = []
    for i, tokens in enumerate(token_counts):
        args = qkv_views(tokens, 3000 + i)
        kernel = apply_rotary(*args)
        eager = rotate_eager(*args)
        compiled = compiled_norm_rope(*args)
        max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(kernel, eager))
        equal = min((a == b).float().mean().item() for a, b in zip(kernel, eager))
        equal_compiled = min((a == b).float().mean().item() for a, b in zip(kernel, compiled))
        ok = max_diff <= 8 * torch.finfo(torch.bfloat16).eps and equal > 0.99
        results.append(dict(tokens=tokens, max_abs_diff_vs_eager=max_diff, equal_fraction_vs_eager=equal,
                            equal_fraction_vs_compiled=equal_compiled, ok=ok))
        print(f"norm + rope T={tokens}: kernel against eager max diff {max_diff:.1e}, {equal:.4%} equal "
              f"({equal_compiled:.4%} equal to the compiled chain) {'ok' if ok else 'FAIL'}", flush=True)
    return results


# ---- timings ---------------------------------------------------------------------------------------------------


# Timed calls rotate over input sets that together exceed this, five times an H100's L2, so that each call reads
# its data from memory as each layer of the engine does (every layer has its own KV cache).
ROTATE_BYTES = 256 * 2 ** 20


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def per_call_ms(calls: list) -> float:
    """Median time of one call, from replays of one CUDA graph that runs all of them in turn.

    The engine replays decode steps as graphs: launch gaps and host overhead stay out of this number as well.
    """
    for call in calls:
        call()  # compiles and allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay) / len(calls)


def bench_copy(numel: int = 256 * 2 ** 20) -> dict:
    src = torch.randn(numel, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return dict(bytes=2 * src.nbytes, ms=ms, gbps=2 * src.nbytes / ms / 1e6)


def kv_bytes(batch: int, context: int) -> int:
    return 2 * context * KV_HEADS * HEAD_DIM * 2 * batch  # K and V, bf16, one layer


def decode_sets(batch: int, context: int, seed: int) -> list[tuple]:
    """(q, k_cache, v_cache, tables, lens) sets of `batch` rows at `context` on disjoint blocks, ROTATE_BYTES in all."""
    sets = math.ceil(ROTATE_BYTES / kv_bytes(batch, context))
    q, k_cache, v_cache, tables, lens = paged_inputs([context] * batch * sets, seed, pad_blocks=0, poison=False)
    rows = [slice(i * batch, (i + 1) * batch) for i in range(sets)]
    return [(q[r], k_cache, v_cache, tables[r], lens[r]) for r in rows]


def bench_attention(sizes=((1, 2048), (1, 8192), (1, 32768), (1, 131072), (32, 2048), (32, 8192))) -> list[dict]:
    results = []
    for batch, context in sizes:
        sets = decode_sets(batch, context, seed=context + batch)
        kernel = per_call_ms([partial(paged_decode_attention, *s, SCALE, torch.empty_like(s[0])) for s in sets])
        sdpa = per_call_ms([partial(sdpa_gather_decode, *s, SCALE) for s in sets])
        nbytes = kv_bytes(batch, context)
        results.append(dict(batch=batch, context=context, bytes=nbytes, rotated_sets=len(sets),
                            splits=default_num_splits(batch, KV_HEADS, context, DEV),
                            kernel_ms=kernel, kernel_gbps=nbytes / kernel / 1e6,
                            sdpa_ms=sdpa, sdpa_gbps=nbytes / sdpa / 1e6))
        del sets
    return results


def quant_bytes(m: int, k: int) -> int:
    return m * k * 2 + m * k + m * 4  # bf16 in, fp8 and float32 scales out


def quant_inputs(m: int, k: int) -> list[torch.Tensor]:
    return [torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            for _ in range(math.ceil(ROTATE_BYTES / quant_bytes(m, k)))]


def bench_quant(m: int = 8192, ks=(4096, 12288)) -> list[dict]:
    results = []
    for k in ks:
        xs = quant_inputs(m, k)
        kernel = per_call_ms([partial(per_token_quant_fp8, x) for x in xs])
        eager = per_call_ms([partial(quantize_rowwise, x) for x in xs])
        nbytes = quant_bytes(m, k)
        results.append(dict(m=m, k=k, bytes=nbytes, kernel_ms=kernel, kernel_gbps=nbytes / kernel / 1e6,
                            eager_ms=eager, eager_gbps=nbytes / eager / 1e6))
    return results


def bench_gated_quant(ms=(2048, 8192), k: int = 12288) -> list[dict]:
    """The down projection's input: fused SiLU-and-mul + quantization against the two passes it replaces."""
    results = []
    for m in ms:
        xs = [torch.randn(m, 2 * k, device=DEV, dtype=torch.bfloat16)
              for _ in range(math.ceil(ROTATE_BYTES / (m * k * 4)))]
        fused = {w: per_call_ms([partial(silu_and_mul_quant_fp8, x, num_warps=w) for x in xs]) for w in (8, 16, 32)}
        unfused = per_call_ms([lambda x=x: per_token_quant_fp8(silu_and_mul(x)) for x in xs])
        silu_only = per_call_ms([partial(silu_and_mul, x) for x in xs])
        best = min(fused, key=fused.get)
        nbytes = m * k * 4 + m * k + m * 4  # [gate | up] bf16 in, fp8 and scales out
        results.append(dict(m=m, k=k, fused_ms_by_warps=fused, best_warps=best, fused_ms=fused[best],
                            fused_gbps=nbytes / fused[best] / 1e6, unfused_ms=unfused, silu_only_ms=silu_only,
                            silu_only_gbps=m * k * 6 / silu_only / 1e6, speedup=unfused / fused[best]))
        print(f"gated quant M={m} K={k}: fused {fused[best]:.4f} ms ({nbytes / fused[best] / 1e6:.0f} GB/s, "
              f"{best} warps; by warps {', '.join(f'{w}: {t:.4f}' for w, t in fused.items())}), silu_and_mul + "
              f"quant {unfused:.4f} ms ({unfused / fused[best]:.2f}x), silu_and_mul alone {silu_only:.4f} ms "
              f"({m * k * 6 / silu_only / 1e6:.0f} GB/s)", flush=True)
        del xs
    return results


def bench_norm_rope(token_counts=(2048, 8192)) -> list[dict]:
    """One layer's QK-norm + RoPE at Qwen3-8B shapes: the kernel, the compiled chain, the four passes before it."""
    results = []
    for tokens in token_counts:
        sets = [qkv_views(tokens, 3100 + i) for i in range(math.ceil(ROTATE_BYTES / (tokens * 6144 * 2)))]
        times = {name: per_call_ms([partial(fn, *args) for args in sets])
                 for name, fn in (("kernel", apply_rotary), ("compiled", compiled_norm_rope),
                                  ("unfused", unfused_norm_rope))}
        nbytes = 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * 2  # q and k read and written once, bf16
        results.append(dict(tokens=tokens, **{f"{name}_ms": t for name, t in times.items()},
                            kernel_gbps=nbytes / times["kernel"] / 1e6))
        print(f"norm + rope T={tokens}: kernel {times['kernel'] * 1e3:.1f} us ({nbytes / times['kernel'] / 1e6:.0f} "
              f"GB/s), compiled chain {times['compiled'] * 1e3:.1f} us ({times['compiled'] / times['kernel']:.2f}x), "
              f"four passes {times['unfused'] * 1e3:.1f} us ({times['unfused'] / times['kernel']:.2f}x)", flush=True)
        del sets
    return results


def tune(attention_sizes=((1, 32768), (32, 8192)), quant_m: int = 8192, quant_ks=(4096, 12288)) -> dict:
    """Launch shapes around the defaults, for the next round of tuning (not a check)."""
    attention = []
    for batch, context in attention_sizes:
        sets = decode_sets(batch, context, seed=5)
        outs = [torch.empty_like(s[0]) for s in sets]
        default = default_num_splits(batch, KV_HEADS, context, DEV)
        variants = [(DecodeConfig(*shape), default) for shape in
                    ((64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 3))]
        variants += [(DecodeConfig(), splits) for splits in (default // 4, default // 2, default * 2) if splits]
        for config, splits in variants:
            ms = per_call_ms([partial(paged_decode_attention, *s, SCALE, out, num_splits=splits, config=config)
                              for s, out in zip(sets, outs)])
            attention.append(dict(batch=batch, context=context, block_n=config.block_n, num_warps=config.num_warps,
                                  num_stages=config.num_stages, splits=splits, ms=ms,
                                  gbps=kv_bytes(batch, context) / ms / 1e6))
        del sets, outs
    quant = []
    for k in quant_ks:
        xs = quant_inputs(quant_m, k)
        for num_warps in (2, 4, 8, 16):
            ms = per_call_ms([partial(per_token_quant_fp8, x, num_warps=num_warps) for x in xs])
            quant.append(dict(m=quant_m, k=k, num_warps=num_warps, ms=ms, gbps=quant_bytes(quant_m, k) / ms / 1e6))
    return dict(attention=attention, quant=quant)


# ---- FP8 causal prefill attention ------------------------------------------------------------------------------

FP8_VS_SDPA = 8e-2  # rel. error bound; expected ~4.7e-2 on N(0, 1) inputs (the CPU emulation at 2k-4k tokens)
FP8_VS_EMULATION = 1e-2  # expected ~1e-3: ex2.approx, FMA contraction and MMA sums flip a few fp8 roundings of P
# cuDNN against an emulation whose P is relative to the global row max (cuDNN's: the running max): a guess
CUDNN_VS_EMULATION = 3e-2
NEEDLE_TOLERANCE = 5e-2  # the needle row against the needle's value: V's fp8 rounding (~3%) for FP8


def prefill_qkv(tokens: int, seed: int):
    """q [tokens, 32, 128], k and v [tokens, 8, 128], bf16 N(0, 1): q.k * SCALE has a standard deviation of 1."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(tokens, heads, HEAD_DIM, generator=g, device=DEV, dtype=torch.bfloat16)
            for heads in (HEADS, KV_HEADS, KV_HEADS)]


def sdpa_prefill(q, k, v) -> torch.Tensor:
    """The engine's BF16 prefill path (TorchAttentionBackend._segment with nothing cached)."""
    def heads_first(x):
        return x.unsqueeze(0).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=SCALE,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def exact_rows(q, k, v, rows: torch.Tensor) -> torch.Tensor:
    """Float64 causal attention of the given query rows only: [len(rows), HEADS, HEAD_DIM]."""
    group = HEADS // KV_HEADS
    out = torch.empty(len(rows), HEADS, HEAD_DIM, dtype=torch.float64, device=DEV)
    keys = torch.arange(q.shape[0], device=DEV)
    for kv_head in range(KV_HEADS):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        scores = torch.einsum("rgd,ld->grl", q[rows, heads].double(), k[:, kv_head].double()) * SCALE
        scores = scores.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))
        out[:, heads] = torch.einsum("grl,ld->rgd", scores.softmax(-1), v[:, kv_head].double())
    return out


def triton_fp8(config: PrefillConfig):
    """The Triton kernel at one launch shape and its PyTorch emulation, (attend, emulate) of (q, k, v); attend
    writes into a NaN-filled output, so that a row the kernel left unwritten fails the checks."""
    return (lambda q, k, v: fp8_prefill_attention(q, k, v, SCALE, torch.full_like(q, float("nan")), config=config),
            lambda q, k, v: fp8_attention_reference(q, k, v, SCALE, config))


def cudnn_fp8():
    return (lambda q, k, v: cudnn_fp8_prefill_attention(q, k, v, SCALE),
            lambda q, k, v: cudnn_fp8_attention_reference(q, k, v, SCALE))


def check_fp8_prefill(attend, emulate, lengths=(4096, 32768), emulation_bound=FP8_VS_EMULATION) -> list[dict]:
    results = []
    for tokens in lengths:
        q, k, v = prefill_qkv(tokens, seed=tokens)
        out = attend(q, k, v)
        sdpa = sdpa_prefill(q, k, v)
        rows = torch.linspace(0, tokens - 1, 96, device=DEV).long()
        exact = exact_rows(q, k, v, rows)
        r = dict(tokens=tokens, finite=bool(torch.isfinite(out).all()), rel_err_vs_sdpa=rel_err(out, sdpa),
                 rows_rel_err_vs_float64=rel_err(out[rows], exact),
                 sdpa_rows_rel_err_vs_float64=rel_err(sdpa[rows], exact))
        if tokens <= 4096:  # the emulation holds float32 copies of everything: the short length only
            r["rel_err_vs_emulation"] = rel_err(out, emulate(q, k, v))
        r["ok"] = (r["finite"] and r["rel_err_vs_sdpa"] < FP8_VS_SDPA
                   and r.get("rel_err_vs_emulation", 0) < emulation_bound)
        results.append(r)
        print(f"fp8 prefill T={tokens:6}: vs sdpa {r['rel_err_vs_sdpa']:.2e}, rows vs float64 "
              f"{r['rows_rel_err_vs_float64']:.2e} (sdpa {r['sdpa_rows_rel_err_vs_float64']:.2e}), vs emulation "
              f"{format(r['rel_err_vs_emulation'], '.2e') if 'rel_err_vs_emulation' in r else 'not run'} "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
        del q, k, v, out, sdpa
    return results


def check_needles(attend, lengths=(32768, 131072)) -> list[dict]:
    """Per length, four (query, key) pairs in different heads, one key each made to match its query far above the
    other keys (score ~30 against N(0, 1)): the query's output must be that key's value, as SDPA's is."""
    results = []
    for tokens in lengths:
        q, k, v = prefill_qkv(tokens, seed=tokens + 1)
        group = HEADS // KV_HEADS
        # (query, key, q head): the last token reading the first tile, one key back, across a long span, and a
        # key in the query's own tile
        pairs = [(tokens - 1, 17, 1), (tokens - 1, tokens - 2, 9), (tokens // 2 + 100, tokens // 8, 18),
                 (tokens // 3, tokens // 3 - 3, 27)]
        for query, key, head in pairs:
            k[key, head // group] = q[query, head] * 2.7  # q.k * SCALE ~ 2.7 * 128 / sqrt(128) ~ 30
        out = attend(q, k, v)
        sdpa = sdpa_prefill(q, k, v)
        for query, key, head in pairs:
            value = v[key, head // group]
            r = dict(tokens=tokens, query=query, key=key, head=head, fp8_rel_err=rel_err(out[query, head], value),
                     sdpa_rel_err=rel_err(sdpa[query, head], value))
            r["ok"] = r["fp8_rel_err"] < NEEDLE_TOLERANCE and r["sdpa_rel_err"] < NEEDLE_TOLERANCE
            results.append(r)
            print(f"needle T={tokens:6} query={query:6} key={key:6} head={head:2}: fp8 {r['fp8_rel_err']:.2e} "
                  f"sdpa {r['sdpa_rel_err']:.2e} {'ok' if r['ok'] else 'FAIL'}", flush=True)
        del q, k, v, out, sdpa
    return results


def causal_flops(tokens: int) -> float:
    return 2 * 2 * HEADS * tokens * tokens / 2 * HEAD_DIM


def bench_fp8_prefill(attend, quantize, lengths=(4096, 8192, 32768, 131072)) -> list[dict]:
    """attend(q, k, v) against SDPA; quantize(q, k, v): the part of attend that quantizes its operands."""
    results = []
    for tokens in lengths:
        q, k, v = prefill_qkv(tokens, seed=3)
        kernel = median_ms(lambda: attend(q, k, v))
        quant = median_ms(lambda: quantize(q, k, v))
        sdpa = median_ms(lambda: sdpa_prefill(q, k, v))
        flops = causal_flops(tokens)
        results.append(dict(tokens=tokens, kernel_ms=kernel, kv_quant_ms=quant, sdpa_ms=sdpa,
                            kernel_tflops=flops / kernel / 1e9, sdpa_tflops=flops / sdpa / 1e9,
                            speedup=sdpa / kernel))
        del q, k, v
    return results


FP8_PREFILL_SWEEP = [PrefillConfig(), PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 128, 8, 2),
                     PrefillConfig(64, 64, 4, 3)]


def tune_fp8_prefill(tokens: int = 32768) -> list[dict]:
    """Tile shapes around the default at one length (not a check; each shape compiles once, a few seconds)."""
    q, k, v = prefill_qkv(tokens, seed=4)
    out = torch.empty_like(q)
    results = []
    for config in FP8_PREFILL_SWEEP:
        ms = median_ms(lambda: fp8_prefill_attention(q, k, v, SCALE, out, config=config))
        results.append(dict(tokens=tokens, **vars(config), ms=ms, tflops=causal_flops(tokens) / ms / 1e9))
    return results


def print_attention_timings(title: str, timings: list[dict]):
    print(f"{title:22} {'kernel ms':>10} {'TFLOP/s':>8} {'quant ms':>9} {'sdpa ms':>9} {'TFLOP/s':>8} {'speedup':>8}")
    for r in timings:
        print(f"T={r['tokens']:<20} {r['kernel_ms']:10.3f} {r['kernel_tflops']:8.0f} {r['kv_quant_ms']:9.3f} "
              f"{r['sdpa_ms']:9.3f} {r['sdpa_tflops']:8.0f} {r['speedup']:7.2f}x")


def print_fp8_prefill(report: dict):
    print_attention_timings("fp8 prefill attention", report["fp8_prefill_timings"])
    for r in report["fp8_prefill_tuning"]:
        print(f"tuning fp8 prefill T={r['tokens']} block_m={r['block_m']} block_n={r['block_n']} "
              f"warps={r['num_warps']} stages={r['num_stages']}: {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s")


def fp8_prefill_report(config: PrefillConfig) -> dict:
    attend, emulate = triton_fp8(config)
    report = dict(fp8_prefill_config=vars(config), fp8_prefill_checks=check_fp8_prefill(attend, emulate),
                  needle_checks=check_needles(attend))
    # timed without the NaN fill of the checks' output
    report["fp8_prefill_timings"] = bench_fp8_prefill(
        lambda q, k, v: fp8_prefill_attention(q, k, v, SCALE, config=config),
        lambda q, k, v: (quantize_blocks_fp8(k, config.block_n), quantize_blocks_fp8(v, config.block_n, transpose=True)))
    report["fp8_prefill_tuning"] = tune_fp8_prefill()
    return report


def cudnn_plan_builds(lengths=(4096, 3001, 32768, 131000)) -> list[dict]:
    """The first call at a new padded length builds cuDNN's plan: its wall time, and the next call's."""
    results = []
    for tokens in lengths:
        q, k, v = prefill_qkv(tokens, seed=5)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            cudnn_fp8_prefill_attention(q, k, v, SCALE)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results.append(dict(tokens=tokens, padded=padded_tokens(tokens), first_s=times[0], second_s=times[1]))
        print(f"cudnn plan T={tokens} (padded {padded_tokens(tokens)}): first call {times[0]:.3f} s, "
              f"second {times[1] * 1e3:.2f} ms", flush=True)
        del q, k, v
    return results


def cudnn_fp8_report() -> dict:
    """cuDNN's FP8 flash attention, per-tensor scales: the same checks and timings as the Triton kernel's; its
    emulation (global row max for P, where cuDNN uses the running one) is looser, hence its own bound."""
    import cudnn

    attend, emulate = cudnn_fp8()
    report = dict(cudnn_frontend=cudnn.__version__, cudnn_backend=cudnn.backend_version(),
                  cudnn_plan_builds=cudnn_plan_builds())
    report["cudnn_checks"] = check_fp8_prefill(attend, emulate, lengths=(3001, 4096, 32768),
                                               emulation_bound=CUDNN_VS_EMULATION)
    report["cudnn_needle_checks"] = check_needles(attend)
    report["cudnn_timings"] = bench_fp8_prefill(attend, lambda q, k, v: [
        quantize_tensor_fp8(x, padded_tokens(q.shape[0])) for x in (q, k, v)])
    return report


# ---- report ----------------------------------------------------------------------------------------------------


def parse_tile(text: str) -> PrefillConfig:
    try:
        block_m, block_n, warps, stages = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 128x128x8x3") from None
    return PrefillConfig(block_m, block_n, warps, stages)


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU checks and timings of mixquant.kernels")
    parser.add_argument("--only", choices=["fp8-prefill", "fp8-cudnn", "gated-quant", "norm-rope", "norm-quant"],
                        help="run one section only")
    parser.add_argument("--fp8-tile", type=parse_tile, default=PrefillConfig(), metavar="MxNxWARPSxSTAGES",
                        help="the fp8 prefill launch shape its checks and timings use (default: PrefillConfig())")
    args = parser.parse_args()
    start = time.time()
    report: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    checks = []
    if args.only in (None, "gated-quant"):
        report["gated_quant_checks"] = check_gated_quant()
        report["gated_quant_timings"] = bench_gated_quant()
        checks += report["gated_quant_checks"]
    if args.only in (None, "norm-quant"):
        report["norm_quant_checks"] = check_norm_quant()
        report["norm_quant_timings"] = bench_norm_quant()
        checks += report["norm_quant_checks"]
    if args.only in (None, "norm-rope"):
        report["norm_rope_checks"] = check_norm_rope()
        report["norm_rope_timings"] = bench_norm_rope()
        checks += report["norm_rope_checks"]
    if args.only is None:
        report["attention_checks"] = check_attention()
        report["graph_check"] = check_graph()
        report["quant_checks"] = check_quant()
        checks += report["attention_checks"] + [report["graph_check"]] + report["quant_checks"]
    if args.only in (None, "fp8-prefill"):
        fp8_start = time.time()
        report.update(fp8_prefill_report(args.fp8_tile))
        report["fp8_prefill_wall_s"] = time.time() - fp8_start
        checks += report["fp8_prefill_checks"] + report["needle_checks"]
    if args.only == "fp8-cudnn":
        report.update(cudnn_fp8_report())
        checks += report["cudnn_checks"] + report["cudnn_needle_checks"]
    if args.only is None:
        report["copy"] = bench_copy()
        report["attention_timings"] = bench_attention()
        report["quant_timings"] = bench_quant()
        report["tuning"] = tune()
    report["ok"] = all(c["ok"] for c in checks)
    report["wall_s"] = time.time() - start

    if args.only is None:
        print_decode_and_quant(report)
    if "fp8_prefill_timings" in report:
        print_fp8_prefill(report)
    if "cudnn_timings" in report:
        print_attention_timings("cudnn fp8 attention", report["cudnn_timings"])
    failed = [c for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(failed)}/{len(checks)} ok; {report['wall_s']:.0f} s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def print_decode_and_quant(report: dict):
    copy = report["copy"]["gbps"]
    print(f"\n{report['device']}  device-to-device copy {copy:.0f} GB/s (read + write)")
    print(f"{'decode attention':22} {'kernel ms':>10} {'GB/s':>7} {'of copy':>8} {'splits':>7} {'sdpa ms':>9} "
          f"{'speedup':>8}")
    for r in report["attention_timings"]:
        print(f"B={r['batch']:<3} context={r['context']:<8} {r['kernel_ms']:10.4f} {r['kernel_gbps']:7.0f} "
              f"{r['kernel_gbps'] / copy:8.0%} {r['splits']:7} {r['sdpa_ms']:9.4f} "
              f"{r['sdpa_ms'] / r['kernel_ms']:7.1f}x")
    print(f"{'fp8 per-token quant':22} {'kernel ms':>10} {'GB/s':>7} {'of copy':>8} {'eager ms':>9} {'speedup':>8}")
    for r in report["quant_timings"]:
        print(f"M={r['m']} K={r['k']:<11} {r['kernel_ms']:10.4f} {r['kernel_gbps']:7.0f} "
              f"{r['kernel_gbps'] / copy:8.0%} {r['eager_ms']:9.4f} {r['eager_ms'] / r['kernel_ms']:7.1f}x")
    best = {}
    for r in report["tuning"]["attention"]:
        key = (r["batch"], r["context"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for (batch, context), r in best.items():
        print(f"tuning B={batch} context={context}: best block_n={r['block_n']} warps={r['num_warps']} "
              f"stages={r['num_stages']} splits={r['splits']} {r['ms']:.4f} ms")
    for k in sorted({r["k"] for r in report["tuning"]["quant"]}):
        r = min((r for r in report["tuning"]["quant"] if r["k"] == k), key=lambda r: r["ms"])
        print(f"tuning quant K={k}: best num_warps={r['num_warps']} {r['ms']:.4f} ms")


if __name__ == "__main__":
    sys.exit(main())
