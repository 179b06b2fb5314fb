"""Where does a step's time go? Profiles one prefill step and a few decode steps on the Qwen3-8B shape.

Usage: PYTHONPATH=. python3 gpu_tests/profile_engine.py [--pairs bf16/bf16,fp8/bf16] [--context 4096] [--quick]
       [--graphs] [--cached-attention]
       PYTHONPATH=. python3 gpu_tests/profile_engine.py --breakdown 2048,4096,8192 [--pairs ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

from gpu_tests.check_engine import write_config_dir
from mixquant import LLM, SamplingParams


def attention_variants(n: int):
    """SDPA backends for one layer's causal GQA prefill at n tokens (32 q heads, 8 kv heads, dim 128)."""
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = 4 * n * n * 32 * 128 / 2
    from triton.testing import do_bench

    variants = {
        "gqa_transposed_views": lambda: F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True),
        "expanded_kv_4d": lambda: F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.repeat_interleave(4, dim=1).transpose(0, 1)[None],
            v.repeat_interleave(4, dim=1).transpose(0, 1)[None], is_causal=True),
        "gqa_4d_contiguous": lambda: F.scaled_dot_product_attention(
            q.transpose(0, 1).contiguous()[None], k.transpose(0, 1).contiguous()[None],
            v.transpose(0, 1).contiguous()[None], is_causal=True, enable_gqa=True),
    }
    for name, fn in variants.items():
        try:
            ms = do_bench(fn, warmup=5, rep=20)
            print(f"attention n={n} {name:24} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"attention n={n} {name:24} failed: {type(e).__name__}: {str(e)[:120]}")


def cached_prefix_attention(new: int, cached: int):
    """One layer's attention for a chunk of `new` tokens after `cached` ones (a later turn with a prefix-cache hit):
    the engine's general segment path (K/V repeated per query head, an explicit mask) against SDPA with a
    lower-right causal bias and GQA, which needs neither; with a fresh causal prefill of `new` tokens for scale."""
    from torch.nn.attention.bias import causal_lower_right
    from triton.testing import do_bench

    total = new + cached
    q = torch.randn(1, 32, new, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, total, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    query_pos = torch.arange(cached, total, device="cuda")

    def masked_repeated():
        mask = torch.arange(total, device="cuda")[None, :] <= query_pos[:, None]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1),
                                              attn_mask=mask[None, None])

    def lower_right_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(new, total), enable_gqa=True)

    def fresh_causal():
        return F.scaled_dot_product_attention(q, k[:, :, :new], v[:, :, :new], is_causal=True, enable_gqa=True)

    reference = masked_repeated().float()
    for name, fn in (("masked_repeated", masked_repeated), ("lower_right_gqa", lower_right_gqa),
                     ("fresh_causal", fresh_causal)):
        try:
            ms = do_bench(fn, warmup=5, rep=50)
            err = (fn().float() - reference).abs().max().item() if name != "fresh_causal" else float("nan")
            print(f"cached-prefix attention new={new} cached={cached} {name:16} {ms:7.3f} ms/layer "
                  f"(x36 {ms * 36:6.1f} ms)  max|diff| {err:.2e}")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"cached-prefix attention {name}: failed: {type(e).__name__}: {str(e)[:160]}")


def host_timeline(engine, ids: list[int], repeats: int = 3):
    """Is a prefill step bound by the host? Times, without the profiler, the Python side of each stage of one step:
    building the inputs, issuing the forward (launches are asynchronous: this is the host's cost), the GPU work left
    once the forward has returned, and the rest of the step (logits, sampling). A GPU tail near zero means the
    GPU waited on the host."""
    runner = engine.runner
    prepare, forward = runner.prepare, runner.forward
    stages: dict[str, float] = {}

    def timed_prepare(batch):
        t = time.perf_counter()
        out = prepare(batch)
        stages["prepare"] = time.perf_counter() - t
        return out

    def timed_forward(inputs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = forward(inputs)
        stages["forward issue"] = time.perf_counter() - t
        torch.cuda.synchronize()
        stages["GPU tail"] = time.perf_counter() - t - stages["forward issue"]
        return out

    runner.prepare, runner.forward = timed_prepare, timed_forward
    try:
        for r in range(repeats):
            engine.add_request(f"host{r}", ids, SamplingParams(max_tokens=1, ignore_eos=True))
            t = time.perf_counter()
            engine.step()
            total = time.perf_counter() - t
            rest = total - sum(stages.values())
            print(f"host timeline {len(ids)} tokens: step {total * 1e3:.1f} ms = " +
                  " + ".join(f"{k} {v * 1e3:.1f}" for k, v in stages.items()) + f" + rest {rest * 1e3:.1f} ms")
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        runner.prepare, runner.forward = prepare, forward


def host_profile(engine, ids: list[int], top: int = 22):
    """Where the host's time in one prefill step goes (cProfile, by own time), and which calls synchronize with the
    GPU (torch's sync debug mode warns at each)."""
    import cProfile
    import io
    import pstats
    import warnings

    engine.add_request("cprofile", ids, SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        profiler.enable()
        engine.step()
        profiler.disable()
        torch.cuda.set_sync_debug_mode(0)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    print("\n".join(line[:160] for line in stream.getvalue().splitlines() if line.strip()))
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    print(f"synchronizing calls in the step: {len(syncs)} {sorted(set(syncs))[:8]}")
    while engine.has_unfinished_requests():
        engine.step()


def graph_vs_eager(engine, ids: list[int], repeats: int = 5):
    """The prefill forward of one prompt, eager against a CUDA graph of the same step: the graph's replay has no
    host work, so it is the GPU time alone, and eager minus graph is what host overhead costs the step (and what
    prefill graphs would save). Also checks that both give the same hidden states."""
    from triton.testing import do_bench

    from mixquant.utils.context import forward_context

    engine.add_request("graph", ids, SamplingParams(max_tokens=1, ignore_eos=True))
    inputs = engine.runner.prepare(engine.scheduler.schedule())
    model = engine.runner.model

    def run():
        with forward_context(inputs.context):
            return model(inputs.input_ids, inputs.positions)

    try:
        with torch.inference_mode():
            eager_out = run().clone()
            eager_ms = do_bench(run, warmup=2, rep=repeats * 100, return_mode="median")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = run()
            graph.replay()
            torch.cuda.synchronize()
            err = ((graph_out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
            graph_ms = do_bench(graph.replay, warmup=2, rep=repeats * 100, return_mode="median")
        print(f"prefill forward {len(ids)} tokens: eager {eager_ms:.1f} ms, CUDA graph {graph_ms:.1f} ms (host "
              f"overhead {eager_ms - graph_ms:.1f} ms, {eager_ms / graph_ms:.2f}x), graph vs eager rel. err {err:.1e}")
    except Exception as e:  # noqa: BLE001 - a diagnostic: report and let the profile go on
        print(f"prefill forward as a CUDA graph failed: {type(e).__name__}: {str(e)[:200]}")
    finally:
        engine.abort_request("graph")


def profile_pair(path, pair: str, context: int, eager: bool = True):
    prefill, decode = pair.split("/")
    llm = LLM(str(path), load_format="dummy", prefill_precision=prefill, decode_precision=decode,
              max_model_len=context + 64, max_num_batched_tokens=context, enable_prefix_caching=False,
              enforce_eager=eager)
    engine = llm.engine
    ids = torch.randint(0, 150000, (context,)).tolist()
    for _ in range(2):  # warm-up
        engine.add_request("w", ids, SamplingParams(max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    host_timeline(engine, ids)
    host_profile(engine, ids)
    graph_vs_eager(engine, ids)
    engine.add_request("r", ids, SamplingParams(max_tokens=9, ignore_eos=True))
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(8):
            engine.step()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    print(f"\n=== {pair} context {context}: prefill step {t1 - t0:.4f} s ({context / (t1 - t0):.0f} tok/s), "
          f"decode {(t2 - t1) / 8 * 1e3:.2f} ms/token")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()


# First match wins: GEMMs with an 8-row tile are the decode rows' GEMVs (the prompt's last token, by the phase rule).
KERNEL_KINDS = (
    ("GEMM fp8", ("qqtst", "e4m3", "f8f8")),
    ("GEMV (decode rows)", ("x8_",)),
    ("GEMM 16-bit", ("nvjet", "gemm", "cutlass", "xmma")),
    ("attention decode", ("_decode_split", "_merge_kernel")),
    ("attention quant/dequant", ("_amax_kernel", "_quantize_tensor", "_dequantize_kernel", "_quantize_blocks")),
    ("attention", ("sdpa", "flash", "fmha", "attention", "_fp8_prefill")),
    ("activation quant", ("_per_token_quant",)),
    ("QK-norm + RoPE", ("_norm_rope", "rotary", "rope")),
    ("norms", ("rsqrt", "rms")),
    ("SiLU-and-mul", ("silu",)),
    ("KV write / copies", ("memcpy", "copy", "index", "fill", "cat", "elementwise")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def step_breakdown(engine, ids: list[int], repeats: int = 3) -> dict:
    """One prefill step (max_tokens=1, as `mixquant bench prefill` times it): its wall time without the profiler
    (median of `repeats`), then, under torch.profiler, its GPU kernels summed by kind and the GPU's busy time (the
    union of kernel intervals), whose gap to the wall time is host-bound idling."""
    def one_step():
        engine.add_request("b", ids, SamplingParams(max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    one_step()
    wall = sorted(one_step() for _ in range(repeats))[repeats // 2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        profiled_wall = one_step()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    kinds: dict[str, float] = {}
    top: dict[str, float] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        kinds[kernel_kind(e.name)] = kinds.get(kernel_kind(e.name), 0.0) + us / 1e3
        top[e.name] = top.get(e.name, 0.0) + us / 1e3
    busy, end, gaps, previous = 0.0, kernels[0].time_range.start, [], kernels[0].name
    for e in kernels:
        start, stop = max(e.time_range.start, end), e.time_range.end
        if e.time_range.start > end:
            gaps.append(((e.time_range.start - end) / 1e3, previous, e.name))
        if stop > start:
            busy += (stop - start) / 1e3
        if stop >= end:
            end, previous = stop, e.name
    span = (end - kernels[0].time_range.start) / 1e3
    return {"tokens": len(ids), "wall_ms": wall * 1e3, "gpu_busy_ms": busy, "kernel_ms": kinds,
            # the profiled step's wall time outside the span of its kernels: before the first, after the last
            "profiled_wall_ms": profiled_wall * 1e3, "outside_kernel_span_ms": profiled_wall * 1e3 - span,
            "largest_gaps": [{"ms": ms, "after": a[:90], "before": b[:90]} for ms, a, b in sorted(gaps)[::-1][:6]],
            "gaps_ms": sum(g[0] for g in gaps),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}


def breakdown(path, pairs: list[str], contexts: list[int], out: str | None):
    """Per pair, one engine as the prefill benchmark builds it, each context's step broken down by kernel kind."""
    import json

    from mixquant.bench.offline import _engine, _release_memory

    results = []
    for pair in pairs:
        engine = _engine(str(path), pair, max(contexts) + 16, max(contexts), 4, None, eager=False)
        for context in contexts:
            ids = torch.randint(0, 150000, (context,), generator=torch.Generator().manual_seed(context)).tolist()
            result = {"pair": pair, **step_breakdown(engine, ids)}
            results.append(result)
            print(f"\n=== {pair} {context} tokens: step {result['wall_ms']:.1f} ms "
                  f"({context / result['wall_ms'] * 1e3:,.0f} tok/s), GPU busy {result['gpu_busy_ms']:.1f} ms; "
                  f"profiled step {result['profiled_wall_ms']:.1f} ms = kernel span + "
                  f"{result['outside_kernel_span_ms']:.1f} ms outside it; gaps inside {result['gaps_ms']:.2f} ms")
            for gap in result["largest_gaps"]:
                print(f"  gap {gap['ms']:6.3f} ms after {gap['after'][:50]} before {gap['before'][:50]}")
            for kind, ms in sorted(result["kernel_ms"].items(), key=lambda kv: -kv[1]):
                print(f"  {kind:26} {ms:8.2f} ms")
            for name, ms in result["top_kernels_ms"].items():
                print(f"    {ms:8.2f} ms  {name[:110]}")
        del engine
        _release_memory()
    if out:
        with open(f"{out}/breakdown.json", "w") as f:
            json.dump(results, f, indent=1)


def transformers_prefill(path, context: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    ids = torch.randint(0, 150000, (1, context), device="cuda")
    from triton.testing import do_bench

    with torch.no_grad():
        ms = do_bench(lambda: model(ids, logits_to_keep=1), warmup=2, rep=10)
    print(f"transformers sdpa bf16 prefill {context}: {ms:.1f} ms = {context / ms * 1e3:.0f} tok/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", default="bf16/bf16,fp8/bf16")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="skip the attention variants and transformers")
    parser.add_argument("--graphs", action="store_true",
                        help="profile the engine with its CUDA graphs (prefill pieces and decode) instead of eagerly")
    parser.add_argument("--cached-attention", action="store_true",
                        help="only time attention for chunks after a cached prefix")
    parser.add_argument("--breakdown", default=None,
                        help="comma-separated contexts: break each one's prefill step down by kernel kind")
    parser.add_argument("--out", default=None, help="with --breakdown: write breakdown.json here")
    args = parser.parse_args()
    if args.cached_attention:
        for new, cached in ((1536, 8192), (1536, 16384), (4096, 4096)):
            cached_prefix_attention(new, cached)
        return
    import tempfile
    from pathlib import Path

    if not (args.quick or args.breakdown):
        for n in (4096, 32768):
            attention_variants(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config_dir(Path(tmp) / "q8b")
        if args.breakdown:
            breakdown(path, args.pairs.split(","), [int(c) for c in args.breakdown.split(",")], args.out)
            return
        if not args.quick:
            transformers_prefill(path, args.context)
        for pair in args.pairs.split(","):
            profile_pair(path, pair, args.context, eager=not args.graphs)


if __name__ == "__main__":
    main()
