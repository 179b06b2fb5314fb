"""GPU check of the engine core (run through the device tool; CI has no GPU).

1. BF16 logits of the engine against transformers on a Qwen3-8B-shaped model cut to a few layers (random weights,
   real per-layer shapes), and greedy agreement.
   With --attention-only instead: on the same cut model, fp8/bf16 with cuDNN's FP8 prefill attention against
   fp8/bf16 with BF16 attention and against bf16/bf16, at 8,192 and 16,384 prompt tokens (logits at every position).
2. The full 36-layer Qwen3-8B shape (random weights) in the pairs bf16/bf16, fp8/bf16, nvfp4/bf16, nvfp4/nvfp4:
   it runs, no NaNs, which kernels ran, first-token logits against bf16/bf16, rough step times (eager; these
   are not benchmarks — `mixquant bench` is).

Usage: PYTHONPATH=. python gpu_tests/check_engine.py --out $OUT [--graphs-only | --reference-only | --attention-only |
       --fusion-only]
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.data import qwen3_tokenizer

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])


def check_kernels() -> dict:
    """Native FP8 and emulated NVFP4 linear methods against float64 references of the same quantized operands."""
    from mixquant.quantization import fp8, nvfp4
    from mixquant.quantization.linear_methods import FP8Method, NVFP4Method

    torch.manual_seed(0)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    m = FP8Method.from_weight(w, None, native=True)
    xq, xs = fp8.quantize_rowwise(x)
    ref = (xq.double() * xs.double()) @ (m.qweight.double() * m.weight_scale.double()).t()
    n = NVFP4Method.from_weight(w, [512, 512], None, native=False, compute_dtype=torch.bfloat16)
    x_gs = nvfp4.global_scale_from_amax(x.abs().amax(-1, keepdim=True).float())
    x_hat = nvfp4.dequantize(*nvfp4.quantize(x, x_gs), x_gs).double()
    w_hat = nvfp4.dequantize(n.packed, n.block_scale, n.weight_global_scale).double()
    return {"fp8_native_vs_f64": rel_err(m(x), ref), "fp8_mode": m.mode,
            "nvfp4_emulated_vs_f64": rel_err(n(x), x_hat @ w_hat.t()), "nvfp4_mode": n.mode}


def write_config_dir(path: Path, **overrides) -> Path:
    from transformers import Qwen3Config

    config = Qwen3Config(**{**QWEN3_8B, **overrides})
    config.dtype = torch.bfloat16
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer() / name, path / name)
    return path


def write_cut_model(path: Path, layers: int, **overrides):
    """The Qwen3-8B shape cut to `layers` layers with transformers' random initialisation (seed 0), saved to `path`
    with the tokenizer; returns (path, the transformers model on the GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_config_dir(path, num_hidden_layers=layers, **overrides)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16).eval()
    model.save_pretrained(path)
    return path, model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def equal_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens agree."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def transformers_outputs(model, ids: list[int], new_tokens: int = 32) -> tuple[torch.Tensor, list[int]]:
    """The reference's prompt logits (float32) and greedy continuation of `ids`."""
    prompt = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        logits = model(prompt).logits[0].float()
        greedy = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    return logits, greedy


def check_against_transformers(workdir: Path, layers: int) -> dict:
    from mixquant import LLM, SamplingParams
    from tests.engine.helpers import engine_prompt_logits

    path, ref = write_cut_model(workdir / "qwen3-8b-shape-cut", layers)
    ids = torch.randint(0, 150000, (1, 1024), generator=torch.Generator().manual_seed(1)).tolist()[0]
    theirs, greedy_ref = transformers_outputs(ref, ids)
    del ref
    torch.cuda.empty_cache()
    llm = LLM(str(path), prefill_precision="bf16", decode_precision="bf16", max_model_len=4096)
    ours = engine_prompt_logits(llm.engine, ids)
    greedy = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    result = {"layers": layers, "prompt_tokens": len(ids), "logits_rel_err": rel_err(ours, theirs),
              "top1_agreement": top1_agreement(ours, theirs),
              "greedy_equal_prefix": equal_prefix(greedy, greedy_ref), "greedy_tokens": len(greedy)}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def check_fp8_attention(workdir: Path, layers: int, lengths=(8192, 16384)) -> list[dict]:
    """Prompt logits of fp8/bf16 with prefill_attention="fp8-cudnn" against the same pair with BF16 attention (what
    the FP8 attention alone changes) and against bf16/bf16 (what FP8 prefill changes in all), per prompt length."""
    from mixquant import LLM
    from tests.engine.helpers import engine_prompt_logits

    path, _ = write_cut_model(workdir / "qwen3-8b-shape-cut-attention", layers,
                              max_position_embeddings=max(lengths) + 64)
    rows = []
    for tokens in lengths:
        ids = torch.randint(0, 150000, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
        logits = {}
        for name, prefill, attention in (("bf16/bf16", "bf16", "bf16"), ("fp8/bf16", "fp8", "bf16"),
                                         ("fp8/bf16 fp8-cudnn", "fp8", "fp8-cudnn")):
            # eager: CUDA graphs change nothing here and their capture would take most of the check's time
            llm = LLM(str(path), prefill_precision=prefill, decode_precision="bf16", prefill_attention=attention,
                      max_model_len=tokens + 64, max_num_batched_tokens=tokens, gpu_memory_utilization=0.5,
                      enforce_eager=True)
            # every 4th of the prefill rows (the last row is the decode token's), to keep the copies small
            logits[name] = engine_prompt_logits(llm.engine, ids)[:-1:4].float().cpu()
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        cudnn, fp8, bf16 = logits["fp8/bf16 fp8-cudnn"], logits["fp8/bf16"], logits["bf16/bf16"]
        row = {"tokens": tokens, "finite": bool(torch.isfinite(cudnn).all()),
               "rel_err_vs_bf16_attention": rel_err(cudnn, fp8), "rel_err_vs_bf16_bf16": rel_err(cudnn, bf16),
               "fp8_linear_rel_err_vs_bf16_bf16": rel_err(fp8, bf16),
               "top1_vs_bf16_attention": (cudnn.argmax(-1) == fp8.argmax(-1)).float().mean().item(),
               "top1_vs_bf16_bf16": (cudnn.argmax(-1) == bf16.argmax(-1)).float().mean().item(),
               "fp8_linear_top1_vs_bf16_bf16": (fp8.argmax(-1) == bf16.argmax(-1)).float().mean().item()}
        rows.append(row)
        print("fp8 attention in the engine:", json.dumps(row), flush=True)
        del logits, cudnn, fp8, bf16
    return rows


def run_pairs(workdir: Path, prompt_len: int, new_tokens: int) -> list[dict]:
    from mixquant import LLM, SamplingParams

    path = write_config_dir(workdir / "qwen3-8b-shape")
    ids = torch.randint(0, 150000, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    rows, reference = [], None
    for prefill, decode in [("bf16", "bf16"), ("fp8", "bf16"), ("nvfp4", "bf16"), ("nvfp4", "nvfp4")]:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        llm = LLM(str(path), load_format="dummy", prefill_precision=prefill, decode_precision=decode,
                  max_model_len=8192, max_num_batched_tokens=8192, gpu_memory_utilization=0.85)
        load_s = time.perf_counter() - t0
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
        engine.add_request("warm", ids[:256], SamplingParams(max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
        engine.add_request("r", ids, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.step()  # whole prompt: prefill rows + the last prompt token's decode row
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            out = engine.step() or out
        torch.cuda.synchronize()
        decode_s = (time.perf_counter() - t0) / (new_tokens - 1)
        completion = out[-1].outputs[0]
        layer = engine.runner.model.model.layers[0].mlp.down_proj
        first_lp = completion.logprobs[0][completion.token_ids[0]].logprob
        row = {"pair": f"{prefill}/{decode}", "prefill_kernels": repr(layer.prefill_method),
               "decode_kernels": repr(layer.decode_method), "load_s": round(load_s, 1),
               "ttft_s": round(ttft, 4), "prefill_tok_per_s": round(prompt_len / ttft),
               "decode_ms_per_token": round(decode_s * 1e3, 2), "kv_cache_tokens": engine.kv_cache_tokens(),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
               "finite": bool(all(torch.isfinite(torch.tensor(lp[t].logprob)) for lp, t in
                                  zip(completion.logprobs, completion.token_ids))),
               "first_token_logprob": round(first_lp, 4), "tokens": completion.token_ids[:8]}
        if reference is None:
            reference = completion.token_ids
        row["greedy_equal_prefix_vs_bf16"] = next(
            (i for i, (a, b) in enumerate(zip(completion.token_ids, reference)) if a != b), len(reference))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm, engine, layer
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def check_prefill_graphs(workdir: Path) -> list[dict]:
    """Prefill CUDA graphs against the eager forward, per pair: a single prompt (prefill rows + its decode row),
    and prompts of three lengths sent at once and staggered (mixed steps). Same greedy tokens, logprobs close."""
    from mixquant import LLM, SamplingParams

    path = write_config_dir(workdir / "qwen3-8b-shape")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in (2048, 777, 3001)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    rows = []
    for pair in ("bf16/bf16", "fp8/bf16"):
        prefill, decode = pair.split("/")
        results = {}
        for eager in (True, False):
            llm = LLM(str(path), load_format="dummy", prefill_precision=prefill, decode_precision=decode,
                      max_model_len=8192, max_num_batched_tokens=4096, gpu_memory_utilization=0.85,
                      enforce_eager=eager)
            graphs = llm.engine.runner.prefill_graphs is not None
            outs = llm.generate(prompts[:1], params, use_tqdm=False) + llm.generate(prompts, params, use_tqdm=False)
            results[eager] = ([o.outputs[0].token_ids for o in outs],
                              [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob for o in outs], graphs)
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        (tokens_e, lp_e, _), (tokens_g, lp_g, graphs) = results[True], results[False]
        # padding changes the GEMMs' row count, so cuBLAS may pick other kernels: close, not bit-equal
        row = {"pair": pair, "prefill_graphs": graphs, "same_tokens": tokens_e == tokens_g,
               "greedy_equal_prefix": min(next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), len(e))
                                          for e, g in zip(tokens_e, tokens_g)),
               "first_logprob_max_diff": max(abs(a - b) for a, b in zip(lp_e, lp_g))}
        rows.append(row)
        print("prefill graphs vs eager:", json.dumps(row), flush=True)
    return rows


def check_fused_norm_quant(workdir: Path, layers: int, lengths=(2048, 6000)) -> list[dict]:
    """The norms quantizing their own output for FP8 projections (rms_norm_quant_fp8) against the separate norm and
    quantization, on the cut model with transformers' initialisation: prompt logits (every 4th prefill row and the
    decode row) of fp8/bf16 and fp8/fp8 fused and unfused, beside what FP8 itself changes against bf16/bf16. 2,048
    tokens run in prefill graphs, 6,000 eagerly with the decode row after them. The fused reduction moves an FP8
    code by one in ~4e-7 of the values (check_kernels.py --only norm-quant); in the engine one such flip in a key
    reaches every later query, and the per-token requantization downstream turns any difference into FP8-rounding-
    sized noise in the rows it reaches. So the bar is not closeness to the unfused run but accuracy: against
    bf16/bf16, the fused pair must be as close as the unfused one (relative error within 5%, top-1 within 0.02)."""
    from mixquant import LLM
    from mixquant.layers.linear import Linear
    from tests.engine.helpers import engine_prompt_logits

    path, _ = write_cut_model(workdir / "qwen3-8b-shape-cut-fusion", layers)
    fused_check = Linear.takes_quantized_rows
    rows = []
    for tokens in lengths:
        ids = torch.randint(0, 150000, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
        keep = [*range(0, tokens - 1, 4), tokens - 1]
        logits = {}
        runs = [("bf16/bf16", "bf16/bf16", False, False)]
        for pair in ("fp8/bf16", "fp8/fp8"):
            runs += [(pair, pair, True, False), (f"{pair} unfused", pair, False, False),
                     (f"{pair} unfused again", pair, False, False)]  # run to run: the noise floor
        runs += [("fp8/bf16 eager", "fp8/bf16", True, True), ("fp8/bf16 unfused eager", "fp8/bf16", False, True)]
        for name, pair, fused, eager in runs:
            prefill, decode = pair.split("/")
            Linear.takes_quantized_rows = fused_check if fused else (lambda self, rows: False)
            try:
                llm = LLM(str(path), prefill_precision=prefill, decode_precision=decode, max_model_len=tokens + 64,
                          max_num_batched_tokens=tokens, gpu_memory_utilization=0.5, enforce_eager=eager)
                logits[name] = engine_prompt_logits(llm.engine, ids)[keep].float().cpu()
            finally:
                Linear.takes_quantized_rows = fused_check
            del llm
            gc.collect()
            torch.cuda.empty_cache()
        bf16 = logits["bf16/bf16"]
        for pair, unfused_name in (("fp8/bf16", "fp8/bf16 unfused"), ("fp8/fp8", "fp8/fp8 unfused"),
                                   ("fp8/bf16 eager", "fp8/bf16 unfused eager")):
            fused, unfused = logits[pair], logits[unfused_name]
            row = {"tokens": tokens, "pair": pair, "finite": bool(torch.isfinite(fused).all()),
                   "fused_vs_unfused_rel_err": rel_err(fused, unfused),
                   "unfused_vs_bf16_bf16_rel_err": rel_err(unfused, bf16),
                   "fused_vs_bf16_bf16_rel_err": rel_err(fused, bf16),
                   "fused_vs_unfused_top1": (fused.argmax(-1) == unfused.argmax(-1)).float().mean().item(),
                   "unfused_vs_bf16_bf16_top1": (unfused.argmax(-1) == bf16.argmax(-1)).float().mean().item(),
                   "fused_vs_bf16_bf16_top1": (fused.argmax(-1) == bf16.argmax(-1)).float().mean().item()}
            if f"{pair} unfused again" in logits:
                row["unfused_run_to_run_rel_err"] = rel_err(logits[f"{pair} unfused again"], unfused)
            row["ok"] = (row["finite"]
                         and row["fused_vs_bf16_bf16_rel_err"] <= 1.05 * row["unfused_vs_bf16_bf16_rel_err"]
                         and row["fused_vs_bf16_bf16_top1"] >= row["unfused_vs_bf16_bf16_top1"] - 0.02)
            rows.append(row)
            print("fused norm + quant vs separate:", json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--cut-layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--graphs-only", action="store_true", help="only prefill graphs against eager")
    parser.add_argument("--reference-only", action="store_true", help="only the logits against transformers")
    parser.add_argument("--attention-only", action="store_true", help="only cuDNN FP8 prefill attention in the engine")
    parser.add_argument("--fusion-only", action="store_true",
                        help="only the norms' fused FP8 quantization against the separate passes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.graphs_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = check_prefill_graphs(Path(tmp))
        return 0 if all(r["prefill_graphs"] and r["first_logprob_max_diff"] < 0.05 for r in rows) else 1
    if args.fusion_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = check_fused_norm_quant(Path(tmp), args.cut_layers)
        (out / "engine_check_fusion.json").write_text(json.dumps(rows, indent=2))
        print("PASS" if all(r["ok"] for r in rows) else "FAIL")
        return 0 if all(r["ok"] for r in rows) else 1
    if args.attention_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = check_fp8_attention(Path(tmp), args.cut_layers)
        (out / "engine_check_attention.json").write_text(json.dumps(rows, indent=2))
        # FP8 attention must not cost more agreement with bf16/bf16 than the FP8 linear layers already do, twice over
        ok = all(r["finite"] and 1 - r["top1_vs_bf16_bf16"] <= 2 * (1 - r["fp8_linear_top1_vs_bf16_bf16"]) + 0.01
                 for r in rows)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    if args.reference_only:
        with tempfile.TemporaryDirectory() as tmp:
            ref = check_against_transformers(Path(tmp), args.cut_layers)
        print("transformers check:", json.dumps(ref), flush=True)
        return 0 if ref["logits_rel_err"] < 0.02 and ref["top1_agreement"] > 0.95 else 1
    kernels = check_kernels()
    print("kernel check:", json.dumps(kernels), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref = check_against_transformers(Path(tmp), args.cut_layers)
        print("transformers check:", json.dumps(ref), flush=True)
        rows = run_pairs(Path(tmp), args.prompt_len, args.new_tokens)
        graph_rows = check_prefill_graphs(Path(tmp))
    (out / "engine_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                       "kernels": kernels,
                                                       "transformers_check": ref, "pairs": rows,
                                                       "prefill_graphs": graph_rows}, indent=2))
    print(f"\n{'pair':14} {'prefill kernels':16} {'decode':14} {'ttft s':>8} {'prefill tok/s':>13} "
          f"{'decode ms/tok':>13} {'KV tokens':>10} {'peak GiB':>8} finite")
    for r in rows:
        print(f"{r['pair']:14} {r['prefill_kernels']:16} {r['decode_kernels']:14} {r['ttft_s']:8.3f} "
              f"{r['prefill_tok_per_s']:13d} {r['decode_ms_per_token']:13.2f} {r['kv_cache_tokens']:10d} "
              f"{r['peak_gib']:8.1f} {r['finite']}")
    ok = kernels["fp8_native_vs_f64"] < 1e-2 and kernels["nvfp4_emulated_vs_f64"] < 1e-2
    ok = ok and ref["logits_rel_err"] < 0.02 and ref["top1_agreement"] > 0.95 and all(r["finite"] for r in rows)
    ok = ok and all(r["prefill_graphs"] and r["first_logprob_max_diff"] < 0.05 for r in graph_rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
