"""`mixquant fidelity MODEL --pairs ... [--prompts FILE] [--tasks FILE]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixquant.tiny import tasks

# the paper's pairs and their two baselines
DEFAULT_PAIRS = "bf16/bf16,fp8/bf16,nvfp4/bf16,fp8/fp8,nvfp4/nvfp4"
# generated tokens per prompt for the built-in prompts and prompt files; `--tasks tiny` brings its own budget
DEFAULT_MAX_TOKENS = 64


def default_max_tokens(tasks_spec: str | None) -> int:
    return tasks.MAX_REPLY_TOKENS if tasks_spec == "tiny" else DEFAULT_MAX_TOKENS


def register(subparsers):
    p = subparsers.add_parser("fidelity", help="what each precision pair costs against bf16/bf16 on a model")
    p.add_argument("model", help="checkpoint folder or Hugging Face id (mixquant-tiny: the bundled model)")
    p.add_argument("--pairs", default=DEFAULT_PAIRS,
                   help="comma-separated PREFILL/DECODE pairs; bf16/bf16 always runs, as the reference "
                        "(default: %(default)s)")
    p.add_argument("--prompts", help="JSONL: 'prompt' (text) or 'messages' (chat), optional gold 'answer'; "
                                     "default (with no --tasks either): a small built-in set")
    p.add_argument("--tasks", help="JSONL of prompts that all carry a gold 'answer' (added to --prompts), or "
                                   "'tiny': held-out examples of the bundled model's generated agentic tasks")
    p.add_argument("--task-count", type=int, default=100,
                   help="with --tasks tiny: held-out examples of each task (default: %(default)s)")
    p.add_argument("--max-tokens", type=int,
                   help=f"greedy tokens generated per prompt (default: {DEFAULT_MAX_TOKENS}; with --tasks tiny, "
                        f"{tasks.MAX_REPLY_TOKENS}, which fits the bundled model's answers)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--enable-thinking", action="store_true",
                   help="chat_template_kwargs.enable_thinking for 'messages' prompts (default: off)")
    p.add_argument("--output-dir", default="fidelity-results", help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--tokenizer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixquant.fidelity.run import (
        DEFAULT_PROMPTS,
        FidelityInputError,
        cut_off_warnings,
        parse_pairs,
        read_prompts,
        read_tasks,
        run_fidelity,
        write_outputs,
    )

    # every input is checked before a model loads: a typo should not cost a checkpoint download
    try:
        if args.max_tokens is not None and args.max_tokens < 1:
            raise FidelityInputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.task_count < 1:
            raise FidelityInputError(f"--task-count must be >= 1, got {args.task_count}")
        if args.limit is not None and args.limit < 1:
            raise FidelityInputError(f"--limit must be >= 1, got {args.limit}")
        pairs = parse_pairs(args.pairs)
        rows = (read_prompts(args.prompts) if args.prompts else []) + \
            (read_tasks(args.tasks, args.task_count) if args.tasks else [])
    except FidelityInputError as error:
        print(f"mixquant fidelity: {error}", file=sys.stderr)
        return 2
    rows = (rows or DEFAULT_PROMPTS)[:args.limit]
    max_tokens = args.max_tokens or default_max_tokens(args.tasks)
    result = run_fidelity(args.model, pairs, rows, max_tokens, enable_thinking=args.enable_thinking,
                          dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          tokenizer=args.tokenizer)
    print(write_outputs(result, Path(args.output_dir)))
    for warning in cut_off_warnings(result):
        print(f"mixquant fidelity: warning: {warning}", file=sys.stderr)
    return 0
