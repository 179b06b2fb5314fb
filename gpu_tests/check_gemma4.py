"""GPU check of Gemma 4 on its real shapes (run through the device tool; CI has no GPU), and the numbers that follow
from the shapes alone.

1. The Triton attention Gemma 4 takes on a GPU, at its shapes (32 query heads; sliding layers 16 KV heads of 256
   with a window of 1,024, full layers 4 KV heads of 512): the paged prefill kernel on a fresh 4,096-token prompt
   and on a chunk after a cached prefix, and the paged decode kernel with and without the window, each against
   float32 attention over the same K/V (and timed).
2. The engine against transformers on the 31B and 26B-A4B shapes cut to 6 layers (5 sliding, 1 full; transformers'
   random initialisation), prompts of 3,000 tokens (past the window): BF16 logits and greedy tokens, decode CUDA
   graphs against eager, fp8/bf16 against bf16/bf16.
With --computed (no GPU needed): weight memory per precision pair, KV bytes per token by layer kind, and the KV
tokens left on a 139 GiB card (an H200 as torch reports it), computed from the shapes with the model built on the
meta device: nothing is measured.

Usage: PYTHONPATH=. python gpu_tests/check_gemma4.py --out $OUT [--cut-layers 6] | --computed
Not yet run on a GPU: none was lent in the session that wrote it (docs/benchmarks.md).
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

from gpu_tests.check_engine import equal_prefix, rel_err, top1_agreement, transformers_outputs
from mixquant.bench.shapes import SHAPES
from tests.data import qwen3_tokenizer

GEMMA4_SHAPES = ("gemma4-31b", "gemma4-26b-a4b")


def _text_config(name: str, **overrides):
    from transformers import Gemma4TextConfig

    shape = {k: v for k, v in SHAPES[name].items() if k not in ("model_type", "torch_dtype")}
    return Gemma4TextConfig(**{**shape, **overrides})


# ---- 1. kernels ---------------------------------------------------------------------------------------------------

def _reference(q, k, v, positions, key_positions, window):
    """float32 attention of queries at `positions` over keys at `key_positions` (GQA by repeating K/V)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))
    distance = positions[:, None] - key_positions[None, :]
    visible = (distance >= 0) & (distance < (window or distance.max().item() + 1))
    scores = (q.float().transpose(0, 1) @ k.transpose(1, 2)).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def _timed_ms(fn, repeats: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def check_kernels() -> list[dict]:
    from mixquant.kernels.paged_attention import paged_decode_attention
    from mixquant.kernels.prefill_attention import paged_prefill_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kind, kv_heads, head_dim, window in (("sliding", 16, 256, 1024), ("full", 4, 512, None)):
        block_size, total = 16, 4096 + 1024
        blocks = total // block_size
        table = torch.randperm(blocks + 8, device="cuda", generator=gen)[:blocks]
        cache = torch.randn(blocks + 8, block_size, kv_heads, head_dim, device="cuda", generator=gen).bfloat16()
        k_cache, v_cache = cache, torch.randn_like(cache, dtype=torch.float32).bfloat16()
        pos = torch.arange(total, device="cuda")
        k, v = k_cache[table[pos // block_size], pos % block_size], v_cache[table[pos // block_size], pos % block_size]
        for rows_in, start in ((4096, 0), (1024, 4096)):  # a fresh prompt; a chunk after a 4,096-token prefix
            q = torch.randn(rows_in, 32, head_dim, device="cuda", generator=gen).bfloat16()
            first = 0 if window is None else max(0, start - window + 1) // block_size
            out = paged_prefill_attention(q, k_cache, v_cache, table[first:].contiguous(), start, 1.0, window, first)
            ref = _reference(q, k[:start + rows_in], v[:start + rows_in], pos[start:start + rows_in],
                             pos[:start + rows_in], window)
            ms = _timed_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, table[first:].contiguous(), start,
                                                           1.0, window, first))
            rows.append({"kernel": "prefill", "layer": kind, "rows": rows_in, "context_start": start,
                         "rel_err": rel_err(out, ref), "finite": bool(torch.isfinite(out).all()), "ms": ms})
            print("kernel:", json.dumps(rows[-1]), flush=True)
        lengths = torch.tensor([1, 700, 1025, 3000, 4096, 5000, 5120, 17], dtype=torch.int32, device="cuda")
        q = torch.randn(len(lengths), 32, head_dim, device="cuda", generator=gen).bfloat16()
        tables, refs = [], []
        for length in lengths.tolist():
            first = 0 if window is None else max(0, length - window) // block_size
            tables.append(torch.cat([table[first:], table[:first]]))  # window-relative
            refs.append(_reference(q[len(refs)][None], k[:length], v[:length], pos[length - 1:length],
                                   pos[:length], window)[0])
        tables = torch.stack(tables).to(torch.int32)
        out = paged_decode_attention(q, k_cache, v_cache, tables, lengths, 1.0, window=window)
        rows.append({"kernel": "decode", "layer": kind, "rows": len(lengths),
                     "rel_err": rel_err(out, torch.stack(refs)), "finite": bool(torch.isfinite(out).all()),
                     "ms": _timed_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lengths, 1.0,
                                                                    window=window))})
        print("kernel:", json.dumps(rows[-1]), flush=True)
    return rows


# ---- 2. the engine on cut models ----------------------------------------------------------------------------------

def write_cut_model(path: Path, name: str, layers: int):
    """The shape cut to `layers` layers (the default layer_types: 5 sliding then a full one) with transformers'
    random initialisation, saved with the Qwen3 tokenizer; returns (path, the transformers model on the GPU)."""
    from transformers import Gemma4ForCausalLM

    config = _text_config(name, num_hidden_layers=layers, max_position_embeddings=8192)
    config.architectures = ["Gemma4ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma4ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer() / file, path / file)
    return path, model


def check_engine(workdir: Path, name: str, layers: int, prompt_tokens: int = 3000) -> dict:
    from mixquant import LLM, SamplingParams
    from tests.engine.helpers import engine_prompt_logits

    path, ref = write_cut_model(workdir / f"{name}-cut", name, layers)
    ids = torch.randint(0, 150000, (prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    theirs, greedy_ref = transformers_outputs(ref, ids)
    del ref
    torch.cuda.empty_cache()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    result: dict = {"shape": name, "layers": layers, "prompt_tokens": prompt_tokens}
    logits = {}
    for pair, eager in (("bf16/bf16", False), ("bf16/bf16", True), ("fp8/bf16", False)):
        prefill, decode = pair.split("/")
        t0 = time.perf_counter()
        llm = LLM(str(path), prefill_precision=prefill, decode_precision=decode, max_model_len=8192,
                  gpu_memory_utilization=0.5, enforce_eager=eager)
        key = pair + (" eager" if eager else "")
        logits[key] = engine_prompt_logits(llm.engine, ids)
        greedy = llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids
        result[key] = {"load_s": round(time.perf_counter() - t0, 1), "decode_graphs": bool(llm.engine.runner.graphs),
                       "prefill_graphs": llm.engine.runner.prefill_graphs is not None,
                       "finite": bool(torch.isfinite(logits[key]).all()),
                       "window_blocks_released": llm.engine.stats()["num_window_blocks_released"],
                       "greedy_equal_prefix_vs_transformers": equal_prefix(greedy, greedy_ref),
                       "greedy": greedy}
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    base = logits["bf16/bf16"]
    result["bf16_vs_transformers"] = {"logits_rel_err": rel_err(base, theirs),
                                      "top1_agreement": top1_agreement(base, theirs)}
    result["graphs_same_greedy_as_eager"] = result["bf16/bf16"]["greedy"] == result["bf16/bf16 eager"]["greedy"]
    result["fp8/bf16"]["logits_rel_err_vs_bf16_bf16"] = rel_err(logits["fp8/bf16"], base)
    result["fp8/bf16"]["top1_vs_bf16_bf16"] = top1_agreement(logits["fp8/bf16"], base)
    print("engine check:", json.dumps(result, default=str), flush=True)
    return result


# ---- computed from the shapes -------------------------------------------------------------------------------------

GIB = 2 ** 30
H200_GIB = 139  # what torch reports of an H200's 141 GB


def computed(name: str, block_size: int = 16, chunk: int = 8192, utilization: float = 0.9) -> dict:
    """Weight bytes per pair (BF16 weights, plus the prefill precision's copy of every phase-routed layer: FP8 one
    byte a weight and a float32 scale a row; NVFP4 half a byte, an FP8 scale per 16 and a float32 scale a row, as
    Blackwell holds it), KV bytes per token, and KV tokens left beside the weights (activations not subtracted)."""
    from mixquant.engine.kv_cache import KVCacheLayout
    from mixquant.layers.fused_moe import GroupedExperts
    from mixquant.models.loader import build_model

    config = _text_config(name)
    model = build_model(config, torch.bfloat16, torch.device("meta"), 4096)
    bf16 = 2 * sum(p.numel() for p in model.parameters())  # the tied head counted once
    rows = weights = 0
    for layer in model.phase_routed_layers():
        if isinstance(layer, GroupedExperts):
            weights += layer.w13.numel() + layer.w2.numel()
            rows += layer.num_experts * (2 * layer.intermediate_size + layer.hidden_size)
        else:
            weights += layer.weight.numel()
            rows += layer.weight.shape[0]
    copies = {"fp8": weights + 4 * rows, "nvfp4": weights // 2 + weights // 16 + 4 * rows}
    layout = KVCacheLayout(model.attention_layers(), block_size, torch.bfloat16)
    per_token = layout.bytes_per_token()
    result = {"shape": name, "params": bf16 // 2, "phase_routed_params": weights,
              "weights_gib": {"bf16/bf16": round(bf16 / GIB, 1), "fp8/bf16": round((bf16 + copies["fp8"]) / GIB, 1),
                              "nvfp4/bf16 (Blackwell)": round((bf16 + copies["nvfp4"]) / GIB, 1)},
              "kv_bytes_per_token": {"full layers": per_token["full"],
                                     "sliding layers, within the window": per_token["sliding"]},
              "kv_unit_mib": round(layout.unit_bytes / 2 ** 20, 3), "window_units": layout.window_units,
              "unit_padding": round(layout.padding_fraction(), 3), "kv_tokens_on_h200": {}}
    window_blocks = layout.window_table_width()
    for pair, weight_bytes in (("bf16/bf16", bf16), ("fp8/bf16", bf16 + copies["fp8"])):
        units = int((utilization * H200_GIB * GIB - weight_bytes) // layout.unit_bytes)
        result["kv_tokens_on_h200"][pair] = {
            "units": units, "one_sequence_tokens": layout.max_tokens(units, chunk),
            # decoding sequences of 32k tokens each hold 2,048 full-layer blocks and the window's sliding blocks
            "decoding_32k_sequences": units // (32768 // block_size + layout.window_units * window_blocks)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--cut-layers", type=int, default=6)
    parser.add_argument("--computed", action="store_true", help="only the numbers computed from the shapes (CPU)")
    args = parser.parse_args()
    if args.computed:
        print(json.dumps([computed(name) for name in GEMMA4_SHAPES], indent=2))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    kernels = check_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        engines = [check_engine(Path(tmp), name, args.cut_layers) for name in GEMMA4_SHAPES]
    (out / "gemma4_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "kernels": kernels,
                                                       "engines": engines}, indent=2, default=str))
    ok = all(r["finite"] and r["rel_err"] < 2e-2 for r in kernels)
    for engine in engines:
        ok = ok and engine["bf16_vs_transformers"]["logits_rel_err"] < 0.02
        ok = ok and engine["bf16_vs_transformers"]["top1_agreement"] > 0.95 and engine["graphs_same_greedy_as_eager"]
        ok = ok and engine["bf16/bf16"]["decode_graphs"] and engine["fp8/bf16"]["finite"]
        ok = ok and engine["bf16/bf16"]["window_blocks_released"] > 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
