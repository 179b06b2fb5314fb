"""`mixquant bench prefill|decode|structured|serve`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixquant.config import PREFILL_ATTENTIONS


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _attentions(text: str) -> tuple[str, ...]:
    names = tuple(a for a in text.split(",") if a)
    unknown = [a for a in names if a not in PREFILL_ATTENTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: each prefill attention must be one of "
                                         f"{', '.join(PREFILL_ATTENTIONS)}")
    return names


def _add_model_arguments(p):
    p.add_argument("--model", help="a checkpoint folder (its config is used; weights are random)")
    p.add_argument("--shape", default="qwen3-8b", help="a built-in shape with random weights (default qwen3-8b)")
    p.add_argument("--yarn", action="store_true", help="stretch the context 4x with YaRN (for 128k runs)")
    p.add_argument("--hf-overrides", type=json.loads, default={},
                   help='JSON merged into the config, as vllm\'s flag (e.g. \'{"num_hidden_layers": 24}\')')
    p.add_argument("--pairs", default="bf16/bf16,fp8/bf16,nvfp4/bf16", help="prefill/decode precision pairs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N", help="GPUs per engine")
    p.add_argument("--output-dir", default="bench-results")


def register(subparsers):
    bench = subparsers.add_parser("bench", help="speed benchmarks (GPU)").add_subparsers(dest="bench_command",
                                                                                       metavar="KIND")
    p = bench.add_parser("prefill", help="prefill tokens/s and TFLOP/s per pair and context")
    _add_model_arguments(p)
    p.add_argument("--contexts", default="2048,4096,8192,32768")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare", choices=["transformers"], help="add transformers (sdpa, BF16) rows")
    p.add_argument("--prefill-attention", default="auto", type=_attentions,
                   help="attention of the prompt tokens, one or a comma list, each run with every pair: auto (the "
                        "engine's default: fp8-cudnn for fp8 prefill from 7,168 tokens where cuDNN can run it, else "
                        "bf16), bf16 (SDPA), fp8 (Triton kernel, per-tile scales) or fp8-cudnn (cuDNN, per-tensor "
                        "scales); e.g. bf16,auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (prefill graphs cover up to 4,096 "
                                                                "prefill rows a step)")
    p.set_defaults(func=run_offline, kind="prefill")
    p = bench.add_parser("decode", help="decode tokens/s and GB/s per pair and batch")
    _add_model_arguments(p)
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.set_defaults(func=run_offline, kind="decode")
    p = bench.add_parser("structured", help="decode tokens/s with a share of the batch held to a JSON schema")
    _add_model_arguments(p)
    p.set_defaults(pairs="bf16/bf16,fp8/bf16")
    p.add_argument("--tokenizer", help="the model's tokenizer where its folder has none (a --shape has none)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fractions", default="0,0.5,1", help="shares of the batch constrained, one run each")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.set_defaults(func=run_structured)
    try:
        from mixquant.bench.serve import add_serve_arguments, run_serve_command
    except ImportError:  # the serving benchmark is optional in a partial install
        return
    p = bench.add_parser("serve", help="agentic replay (or random lengths) against a running server")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve_command)


def run_offline(args) -> int:
    from mixquant.bench import offline
    from mixquant.bench.report import plot_rows, print_table
    from mixquant.bench.shapes import YARN_128K, shape_dir

    model = args.model or str(shape_dir(args.shape))
    overrides = {**(YARN_128K if args.yarn else {}), **args.hf_overrides} or None
    pairs = args.pairs.split(",")
    ceilings = offline.measure_ceilings()
    if args.kind == "prefill":
        rows = offline.bench_prefill(model, pairs, _ints(args.contexts), args.repeats, overrides,
                                     args.compare == "transformers", attentions=args.prefill_attention,
                                     eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    else:
        rows = offline.bench_decode(model, pairs, _ints(args.batches), args.context, args.steps, overrides,
                                    eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": _device_name(), "ceilings": ceilings, "rows": [r.to_dict() for r in rows]}
    (out / f"{args.kind}.json").write_text(json.dumps(result, indent=2))
    plot_rows(rows, args.kind, out / f"{args.kind}.png")
    print_table(rows, ceilings)
    return 0


def run_structured(args) -> int:
    from mixquant.bench import offline
    from mixquant.bench.shapes import shape_dir

    model = args.model or str(shape_dir(args.shape))
    fractions = [float(x) for x in args.fractions.split(",") if x]
    rows = offline.bench_structured(model, args.pairs.split(","), args.batch, fractions, args.context, args.steps,
                                    args.tokenizer, eager=args.enforce_eager)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": _device_name(), "rows": [r.to_dict() for r in rows]}
    (out / "structured.json").write_text(json.dumps(result, indent=2))
    return 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
