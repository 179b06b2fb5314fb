"""GPU check of Qwen3.5 (run through the device tool; CI has no GPU). Written without a GPU: not run yet.

1. One Gated DeltaNet layer at the 9B shape (bf16, random weights): fla-core's kernels (mixquant[gdn]) against the
   PyTorch reference on the same rows: a prefill group (a fresh segment, a resumed one, a one-row one) and a decode
   group; outputs and the conv and recurrent states they leave.
2. The engine against transformers on the Qwen3.5-9B shape cut to 4 layers (3 Gated DeltaNet, 1 gated attention;
   transformers' random initialisation): prompt logits and greedy tokens; the same greedy tokens with chunked prefill
   and from a prefix hit that resumes at a state snapshot; fp8/bf16 on the same model (finite, top-1 agreement).
3. With --breakdown: the full 32-layer shape (random weights), one prefill of --prompt-len tokens per pair: the
   share of the step the Gated DeltaNet layers take (whole layers, and their conv + recurrence alone), timed with
   CUDA events around them (prefill runs eagerly for this model: its prefill graphs are off).

Usage: PYTHONPATH=. python gpu_tests/check_qwen3_5.py --out $OUT [--breakdown]
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

TOKENS = 150000  # prompt ids stay below the Qwen3 tokenizer's vocabulary, which the cut model carries


def qwen3_5_config(layers: int):
    from transformers import Qwen3_5TextConfig

    shape = {k: v for k, v in SHAPES["qwen3.5-9b"].items() if k not in ("model_type", "torch_dtype")}
    shape.update(num_hidden_layers=layers, layer_types=shape["layer_types"][:layers])
    config = Qwen3_5TextConfig(**shape)
    config.dtype = torch.bfloat16
    return config


def check_layer() -> dict:
    """fla-core against the reference, one layer, the same inputs and initial states."""
    from mixquant.layers import gated_delta_net
    from mixquant.layers.gated_delta_net import GatedDeltaNet
    from mixquant.quantization.linear_methods import BF16Method
    from mixquant.utils.context import ForwardContext, StateSegments, forward_context

    if not gated_delta_net.fla_installed():
        return {"skipped": "fla-core is not installed (pip install 'mixquant[gdn]')"}
    config = qwen3_5_config(1)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        layer = GatedDeltaNet(config, "layer")
    torch.set_default_dtype(torch.float32)
    for name, param in layer.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0, 0.02)
    layer.A_log.data.uniform_(-1, 1)
    for linear in (layer.in_proj_qkvz, layer.out_proj):
        method = BF16Method(linear.weight, None)
        linear.set_methods(method, method)
    shapes = layer.state_shapes(torch.bfloat16)
    initial = {name: torch.randn(6, *shape, dtype=dtype, device="cuda") * 0.1
               for name, (shape, dtype) in shapes.items()}
    lengths, resume = [700, 333, 1, 1, 1], [False, True, True, True, True]  # 3 prefill segments, then 2 decode rows
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    rows = bounds[-1]
    x = torch.randn(rows, config.hidden_size, dtype=torch.bfloat16, device="cuda")
    state = StateSegments(torch.tensor([0, 1, 2, 1, 3], device="cuda"), torch.tensor(resume, device="cuda"), bounds,
                          torch.tensor(bounds, device="cuda"), 3)
    ctx = ForwardContext(num_prefill_rows=bounds[3], slot_mapping=torch.zeros(rows, dtype=torch.long, device="cuda"),
                         state=state)
    results = {}
    for path in ("fla", "reference"):
        gated_delta_net.fla_installed = (lambda: True) if path == "fla" else (lambda: False)
        for name, value in initial.items():
            setattr(layer, name, value.clone())
        with torch.inference_mode(), forward_context(ctx):
            out = layer(x)
        results[path] = (out.float(), {name: getattr(layer, name)[:4].float() for name in initial})
    gated_delta_net.fla_installed = lambda: True
    (fla_out, fla_state), (ref_out, ref_state) = results["fla"], results["reference"]
    row = {"output_rel_err": rel_err(fla_out, ref_out), "finite": bool(torch.isfinite(fla_out).all())}
    row.update({f"{name}_rel_err": rel_err(fla_state[name], ref_state[name]) for name in fla_state})
    row["ok"] = row["finite"] and all(v < 2e-2 for k, v in row.items() if k.endswith("rel_err"))
    return row


def write_cut_model(path: Path, layers: int):
    from transformers import AutoModelForCausalLM

    config = qwen3_5_config(layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer() / name, path / name)
    return model


def check_against_transformers(workdir: Path, layers: int, new_tokens: int = 32) -> dict:
    from mixquant import LLM, SamplingParams
    from tests.engine.helpers import engine_prompt_logits

    path = workdir / "qwen3.5-9b-shape-cut"
    ref = write_cut_model(path, layers)
    ids = torch.randint(0, TOKENS, (1024,), generator=torch.Generator().manual_seed(1)).tolist()
    longer = ids + torch.randint(0, TOKENS, (300,), generator=torch.Generator().manual_seed(2)).tolist()

    theirs, expected = transformers_outputs(ref, ids, new_tokens)
    _, expected_longer = transformers_outputs(ref, longer, new_tokens)
    del ref
    torch.cuda.empty_cache()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    result = {"layers": layers, "prompt_tokens": len(ids)}
    llm = LLM(str(path), prefill_precision="bf16", decode_precision="bf16", max_model_len=4096,
              gpu_memory_utilization=0.5)
    ours = engine_prompt_logits(llm.engine, ids)
    result.update(logits_rel_err=rel_err(ours, theirs),
                  top1_agreement=top1_agreement(ours, theirs),
                  greedy_equal_prefix=equal_prefix(llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids,
                                                   expected))
    hit = llm.generate([longer], params, use_tqdm=False)[0]
    result.update(prefix_hit_tokens=hit.num_cached_tokens, prefix_hit_expected=(len(ids) - 1) // 16 * 16,
                  prefix_hit_greedy_equal_prefix=equal_prefix(hit.outputs[0].token_ids, expected_longer))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    chunked = LLM(str(path), prefill_precision="bf16", decode_precision="bf16", max_model_len=4096,
                  max_num_batched_tokens=300, enable_prefix_caching=False, gpu_memory_utilization=0.5)
    outs = chunked.generate([ids, longer], params, use_tqdm=False)
    result.update(chunked_greedy_equal_prefix=min(equal_prefix(outs[0].outputs[0].token_ids, expected),
                                                  equal_prefix(outs[1].outputs[0].token_ids, expected_longer)))
    del chunked
    gc.collect()
    torch.cuda.empty_cache()
    fp8 = LLM(str(path), prefill_precision="fp8", decode_precision="bf16", max_model_len=4096,
              gpu_memory_utilization=0.5)
    low = engine_prompt_logits(fp8.engine, ids)
    result.update(fp8_finite=bool(torch.isfinite(low).all()),
                  fp8_top1_vs_bf16=top1_agreement(low, ours),
                  gdn_kernels=fp8.engine.runner.model.model.layers[0].linear_attn.kernel_path(torch.device("cuda")))
    del fp8
    gc.collect()
    torch.cuda.empty_cache()
    # bf16 numbers differ in summation order (fla's chunked kernel, cuBLAS): agreement, not equality
    result["ok"] = (result["logits_rel_err"] < 0.03 and result["top1_agreement"] > 0.95
                    and result["prefix_hit_tokens"] == result["prefix_hit_expected"] and result["fp8_finite"])
    return result


def breakdown(prompt_len: int) -> list[dict]:
    """Share of one prefill step that the Gated DeltaNet layers take, per pair, on the full 9B shape."""
    from mixquant import LLM, SamplingParams
    from mixquant.bench.shapes import shape_dir
    from mixquant.layers.gated_delta_net import GatedDeltaNet

    rows = []
    for prefill in ("bf16", "fp8"):
        llm = LLM(str(shape_dir("qwen3.5-9b")), load_format="dummy", skip_tokenizer_init=True,
                  prefill_precision=prefill, decode_precision="bf16", max_model_len=prompt_len + 64,
                  max_num_batched_tokens=prompt_len, max_num_seqs=8, gpu_memory_utilization=0.85)
        events: dict[str, list] = {"layer": [], "mix": [], "step": []}

        def timed(kind, fn):
            def wrapper(*args, **kwargs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                events[kind].append((start, end))
                return out
            return wrapper

        original_forward, original_mix = GatedDeltaNet.forward, GatedDeltaNet._mix
        GatedDeltaNet.forward, GatedDeltaNet._mix = timed("layer", original_forward), timed("mix", original_mix)
        llm.engine.runner.forward = timed("step", llm.engine.runner.forward)
        prompt = torch.randint(0, TOKENS, (prompt_len,), generator=torch.Generator().manual_seed(3)).tolist()
        for _ in range(3):  # the last run counts: the first ones compile and settle
            for values in events.values():
                values.clear()
            llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize()
        GatedDeltaNet.forward, GatedDeltaNet._mix = original_forward, original_mix
        total = {kind: sum(s.elapsed_time(e) for s, e in values) for kind, values in events.items()}
        row = {"pair": f"{prefill}/bf16", "prompt_tokens": prompt_len, "step_ms": round(total["step"], 2),
               "gdn_layers_ms": round(total["layer"], 2), "gdn_conv_and_recurrence_ms": round(total["mix"], 2),
               "gdn_share": round(total["layer"] / total["step"], 3),
               "gdn_recurrence_share": round(total["mix"] / total["step"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_out")
    parser.add_argument("--cut-layers", type=int, default=4)
    parser.add_argument("--breakdown", action="store_true", help="only the Gated DeltaNet share of a prefill step")
    parser.add_argument("--prompt-len", type=int, default=8192)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.breakdown:
        rows = breakdown(args.prompt_len)
        (out / "qwen3_5_breakdown.json").write_text(json.dumps(rows, indent=2))
        return 0
    layer = check_layer()
    print("layer:", json.dumps(layer), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        engine = check_against_transformers(Path(tmp), args.cut_layers)
    print("engine:", json.dumps(engine), flush=True)
    (out / "qwen3_5_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "layer": layer,
                                                        "engine": engine}, indent=2))
    ok = layer.get("ok", True) and engine["ok"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
