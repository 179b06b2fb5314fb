"""GPU check of the MoE path on the Qwen3-30B-A3B shape (run through the device tool; CI has no GPU).

1. The grouped expert GEMM (kernels/fused_moe.py) against the reference path (one product per expert) at one layer's
   real shape (128 experts, top 8, H 2048, I 768), BF16 and FP8, for decode (1, 32 rows) and prefill (4,096 rows).
2. BF16 logits of the engine against transformers on the shape cut to a few layers (transformers' random
   initialisation), greedy agreement, and the same greedy tokens with decode CUDA graphs as eagerly.
3. fp8/bf16 and nvfp4/bf16 on the cut model: finite, first-token logits against bf16/bf16.

Usage: PYTHONPATH=. python gpu_tests/check_moe.py --out $OUT [--cut-layers 4]
Not yet run: no GPU was lent in the session that wrote it (docs/benchmarks.md says what is measured).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from gpu_tests.check_engine import equal_prefix, rel_err, top1_agreement, transformers_outputs
from mixquant.bench.shapes import SHAPES
from tests.data import qwen3_tokenizer


def check_grouped_gemm() -> list[dict]:
    from mixquant.quantization.expert_methods import BF16Experts, ExpertsMethod, FP8Experts

    shape = SHAPES["qwen3-30b-a3b"]
    experts, hidden, inter, top_k = (shape["num_experts"], shape["hidden_size"], shape["moe_intermediate_size"],
                                     shape["num_experts_per_tok"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen).mul_(0.02).bfloat16()
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=gen).mul_(0.02).bfloat16()
    rows = []
    for method in (BF16Experts(w13, w2), FP8Experts.from_weight(w13, w2, native=True)):
        for tokens in (1, 32, 4096):
            x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
            logits = torch.randn(tokens, experts, device="cuda", generator=gen)
            weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).bfloat16()
            fused = method(x, weights, ids)
            reference = ExpertsMethod.__call__(method, x, weights, ids)  # one product per expert, same operands
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                method(x, weights, ids)
            end.record()
            end.synchronize()
            row = {"precision": method.precision, "tokens": tokens, "rel_err_vs_reference": rel_err(fused, reference),
                   "finite": bool(torch.isfinite(fused).all()), "ms": start.elapsed_time(end) / 10}
            rows.append(row)
            print("grouped gemm:", json.dumps(row), flush=True)
    return rows


def write_cut_model(path: Path, layers: int):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    shape = {k: v for k, v in SHAPES["qwen3-30b-a3b"].items() if k not in ("model_type", "torch_dtype")}
    config = CONFIG_MAPPING["qwen3_moe"](**{**shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer() / name, path / name)
    return path, model


def check_engine(workdir: Path, layers: int) -> dict:
    from mixquant import LLM, SamplingParams
    from tests.engine.helpers import engine_prompt_logits

    path, ref = write_cut_model(workdir / "qwen3-30b-a3b-cut", layers)
    ids = torch.randint(0, 150000, (1024,), generator=torch.Generator().manual_seed(1)).tolist()
    theirs, greedy_ref = transformers_outputs(ref, ids)
    del ref
    torch.cuda.empty_cache()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    result = {"layers": layers}
    logits = {}
    for pair, eager in (("bf16/bf16", False), ("bf16/bf16", True), ("fp8/bf16", False), ("nvfp4/bf16", True)):
        prefill, decode = pair.split("/")
        llm = LLM(str(path), prefill_precision=prefill, decode_precision=decode, max_model_len=4096,
                  gpu_memory_utilization=0.5, enforce_eager=eager)
        name = pair + (" eager" if eager else "")
        logits[name] = engine_prompt_logits(llm.engine, ids)
        greedy = llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids
        result[name] = {"decode_graphs": bool(llm.engine.runner.graphs),
                        "finite": bool(torch.isfinite(logits[name]).all()),
                        "greedy_equal_prefix_vs_transformers": equal_prefix(greedy, greedy_ref),
                        "greedy": greedy}
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    base = logits["bf16/bf16"]
    result["bf16_vs_transformers"] = {"logits_rel_err": rel_err(base, theirs),
                                      "top1_agreement": top1_agreement(base, theirs)}
    result["graphs_same_greedy_as_eager"] = result["bf16/bf16"]["greedy"] == result["bf16/bf16 eager"]["greedy"]
    for name in ("fp8/bf16", "nvfp4/bf16 eager"):
        result[name]["logits_rel_err_vs_bf16_bf16"] = rel_err(logits[name], base)
        result[name]["top1_vs_bf16_bf16"] = top1_agreement(logits[name], base)
    print("engine check:", json.dumps(result, default=str), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--cut-layers", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    gemm = check_grouped_gemm()
    with tempfile.TemporaryDirectory() as tmp:
        engine = check_engine(Path(tmp), args.cut_layers)
    (out / "moe_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "grouped_gemm": gemm,
                                                    "engine": engine}, indent=2, default=str))
    ok = all(r["finite"] and r["rel_err_vs_reference"] < (2e-2 if r["precision"] == "bf16" else 3e-2) for r in gemm)
    ok = ok and engine["bf16_vs_transformers"]["logits_rel_err"] < 0.02
    ok = ok and engine["bf16_vs_transformers"]["top1_agreement"] > 0.95 and engine["graphs_same_greedy_as_eager"]
    ok = ok and engine["bf16/bf16"]["decode_graphs"] and all(engine[n]["finite"] for n in
                                                               ("fp8/bf16", "nvfp4/bf16 eager"))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
