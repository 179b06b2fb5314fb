"""`mixquant fidelity MODEL --pairs ...`."""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers):
    p = subparsers.add_parser("fidelity", help="what each precision pair costs against bf16/bf16 on a model")
    p.add_argument("model", help="checkpoint folder or Hugging Face id")
    p.add_argument("--pairs", default="bf16/bf16,fp8/bf16,nvfp4/bf16,fp8/fp8,nvfp4/nvfp4")
    p.add_argument("--prompts", help="JSONL: 'prompt' (text) or 'messages' (chat), optional gold 'answer'; "
                                     "default: a small built-in set")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--output-dir", default="fidelity-results")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--tokenizer")
    p.set_defaults(func=run)


def run(args) -> int:
    from mixquant.fidelity.run import markdown, parse_pairs, plot, read_prompts, run_fidelity

    pairs = parse_pairs(args.pairs)
    rows = read_prompts(args.prompts)[:args.limit]
    result = run_fidelity(args.model, pairs, rows, args.max_tokens, dtype=args.dtype, device=args.device,
                          max_model_len=args.max_model_len, tokenizer=args.tokenizer)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "fidelity.md").write_text(table + "\n")
    plot(result, out / "fidelity.png")
    print(table)
    return 0
