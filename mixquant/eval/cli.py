"""`mixquant eval`: the paper's benchmarks against any OpenAI-compatible endpoint, and a side-by-side comparison.

mixquant eval reasoning    --base-url URL --model NAME [--datasets math500,aime24,aime25,gsm8k] [--seeds 42,43]
mixquant eval longbench-v2 --base-url URL --model NAME [--max-input-tokens 100000] [--cot]
mixquant eval longmemeval  --base-url URL --model NAME --data-file longmemeval_s.json [--judge-model gpt-4o]
mixquant eval compare DIR1 DIR2 ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mixquant import __version__
from mixquant.eval.client import ChatClient, EndpointError, ModelClient, SamplingConfig
from mixquant.eval.data import DatasetUnavailable
from mixquant.eval.metrics import mean_over_seeds, summary_table
from mixquant.eval.runner import Benchmark, ResumeMismatch, RunFiles, run_benchmark
from mixquant.eval.text import PromptBudget

# The judge answers "yes" or "no": greedy, and a few tokens are plenty (as in LongMemEval's evaluate_qa.py).
JUDGE_SAMPLING = SamplingConfig(temperature=0.0, max_tokens=10)
DEFAULT_JUDGE_BASE_URL = "https://api.openai.com/v1"


class CommandError(Exception):
    """A problem with the command line or the environment, reported as one line."""


def register(subparsers: argparse._SubParsersAction) -> None:
    eval_parser = subparsers.add_parser(
        "eval",
        help="run the benchmark suite against an OpenAI-compatible server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = eval_parser.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)

    # Qwen3's recommended thinking-mode sampling, as the paper runs it.
    reasoning = commands.add_parser("reasoning", help="MATH-500, AIME 2024/2025, GSM8K (answers in \\boxed{})")
    _add_run_arguments(reasoning, temperature=0.6, top_p=0.95, top_k=20, max_tokens=32768, enable_thinking=True)
    reasoning.add_argument(
        "--datasets", default="math500,aime24,aime25,gsm8k", help="comma-separated (default: %(default)s)"
    )
    reasoning.add_argument(
        "--data-file",
        action="append",
        metavar="[NAME=]PATH",
        help="a local JSON/JSONL copy instead of the Hugging Face hub; NAME=PATH when several datasets are run "
        "(repeat the flag for each)",
    )
    reasoning.set_defaults(func=_command(_run_reasoning))

    # LongBench v2's own settings (pred.py): temperature 0.1, 128 new tokens, 1024 with --cot; no thinking.
    longbench = commands.add_parser("longbench-v2", help="LongBench v2 multiple choice (503 questions)")
    _add_run_arguments(longbench, temperature=0.1, top_p=None, top_k=None, max_tokens=None, enable_thinking=False)
    longbench.add_argument("--data-file", help="LongBench v2 data.json instead of the Hugging Face hub")
    longbench.add_argument(
        "--max-input-tokens",
        type=int,
        default=100_000,
        help="prompt budget; longer prompts lose their middle (default: %(default)s)",
    )
    longbench.add_argument("--tokenizer", help="tokenizer that counts the budget (default: --model)")
    longbench.add_argument(
        "--cot", action="store_true", help="reason step by step first, then answer in a second request"
    )
    longbench.set_defaults(func=_command(_run_longbench))

    # LongMemEval's own settings (run_generation.py): greedy, 800 new tokens for a step-by-step answer; no thinking.
    longmemeval = commands.add_parser("longmemeval", help="LongMemEval chat-history questions, judged by an LLM")
    _add_run_arguments(longmemeval, temperature=0.0, top_p=None, top_k=None, max_tokens=800, enable_thinking=False)
    longmemeval.add_argument("--data-file", required=True, help="longmemeval_s.json (original or reformatted schema)")
    longmemeval.add_argument("--max-input-tokens", type=int, help="prompt budget; longer prompts lose their middle")
    longmemeval.add_argument("--tokenizer", help="tokenizer that counts --max-input-tokens (default: --model)")
    longmemeval.add_argument("--judge-model", help="judge (e.g. gpt-4o); without one only the answers are written")
    longmemeval.add_argument(
        "--judge-base-url",
        default=DEFAULT_JUDGE_BASE_URL,
        help="judge endpoint, key from OPENAI_API_KEY (default: %(default)s)",
    )
    longmemeval.set_defaults(func=_command(_run_longmemeval))

    compare = commands.add_parser("compare", help="side-by-side table and bar chart of several result directories")
    compare.add_argument(
        "directories", nargs="+", type=Path, help="--output-dir of each run; the first is the reference"
    )
    compare.add_argument(
        "--output", type=Path, default=Path("compare"), help="writes OUTPUT.md and OUTPUT.png (default: %(default)s)"
    )
    compare.set_defaults(func=_command(_run_compare))


def _add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    max_tokens: int | None,
    enable_thinking: bool,
) -> None:
    parser.add_argument(
        "--base-url", required=True, help="OpenAI base URL, e.g. http://localhost:8000/v1 (/v1 may be left out)"
    )
    parser.add_argument("--model", required=True, help="model name as the server knows it")
    parser.add_argument("--api-key", help="bearer token, when the server needs one (default: $OPENAI_API_KEY)")
    parser.add_argument("--seeds", type=_int_list, default=[42], help="comma-separated sampling seeds (default: 42)")
    parser.add_argument("--max-concurrency", type=int, default=64, help="requests in flight (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N items of each dataset")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"), help="default: %(default)s")
    parser.add_argument("--resume", action="store_true", help="keep the answers already in --output-dir, ask the rest")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=temperature, help="default: %(default)s")
    sampling.add_argument("--top-p", type=float, default=top_p, help="default: %(default)s")
    sampling.add_argument("--top-k", type=int, default=top_k, help="default: %(default)s")
    sampling.add_argument("--max-tokens", type=int, default=max_tokens, help="default: %(default)s")
    sampling.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=enable_thinking,
        help="chat_template_kwargs.enable_thinking for Qwen3-style templates (default: %(default)s)",
    )
    parser.add_argument("--max-retries", type=int, default=8, help="per request, on 429/5xx and connection errors")
    parser.add_argument(
        "--request-timeout", type=float, default=3600.0, help="seconds per request (default: %(default)s)"
    )


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report the errors a user can fix (missing data, a wrong URL or model, a mismatched --resume) as one line."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (CommandError, DatasetUnavailable, ResumeMismatch) as error:
            print(f"mixquant eval: {error}", file=sys.stderr)
            return 2
        except EndpointError as error:
            print(f"mixquant eval: the endpoint refused the run: {error}", file=sys.stderr)
            return 1

    return guarded


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        enable_thinking=args.enable_thinking,
    )


def _prompt_budget(args: argparse.Namespace) -> PromptBudget:
    from transformers import AutoTokenizer  # heavy: only the long-context benchmarks count tokens

    name = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # the served name is often neither a hub id nor a local path
        raise CommandError(
            f"could not load the tokenizer {name!r} ({error}); pass --tokenizer with a hub id or a directory"
        ) from error
    return PromptBudget(tokenizer, name, args.max_input_tokens)


def _run_reasoning(args: argparse.Namespace) -> int:
    from mixquant.eval.reasoning import DATASETS, ReasoningBenchmark

    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise CommandError(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    data_files: dict[str, str] = {}
    for value in args.data_file or []:
        name, has_name, path = value.partition("=")
        if has_name and name in DATASETS:
            data_files[name] = path
        elif len(names) == 1:
            data_files[names[0]] = value
        else:
            raise CommandError(f"with several datasets, give each --data-file as NAME=PATH (got {value!r})")
    benchmarks, unavailable = [], []
    for name in names:  # report every missing dataset at once, not one per attempt
        try:
            benchmarks.append(ReasoningBenchmark(DATASETS[name], data_files.get(name)))
        except DatasetUnavailable as error:
            unavailable.append(str(error))
    if unavailable:
        raise DatasetUnavailable("\n".join(unavailable))
    return asyncio.run(_run_benchmarks(args, benchmarks, _sampling(args)))


def _run_longbench(args: argparse.Namespace) -> int:
    from mixquant.eval.longbench import LongBenchV2

    sampling = _sampling(args)
    if sampling.max_tokens is None:
        sampling.max_tokens = 1024 if args.cot else 128
    benchmark = LongBenchV2(_prompt_budget(args), cot=args.cot, data_file=args.data_file)
    return asyncio.run(_run_benchmarks(args, [benchmark], sampling))


def _run_longmemeval(args: argparse.Namespace) -> int:
    from mixquant.eval.longmemeval import LongMemEval

    judge_client = None
    judge = None
    if args.judge_model:
        judge_client = ChatClient(
            args.judge_base_url,
            os.environ.get("OPENAI_API_KEY"),
            max_connections=args.max_concurrency,
            max_retries=args.max_retries,
        )
        judge = ModelClient(judge_client, args.judge_model, JUDGE_SAMPLING)
    budget = _prompt_budget(args) if args.max_input_tokens else None
    benchmark = LongMemEval(args.data_file, judge, budget)
    return asyncio.run(_run_benchmarks(args, [benchmark], _sampling(args), also_close=judge_client))


def _run_compare(args: argparse.Namespace) -> int:
    from mixquant.eval.compare import compare

    try:
        table = compare(args.directories, args.output)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from error
    print(table)
    print(f"\nwrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.png')}")
    return 0


def run_config(
    args: argparse.Namespace,
    benchmark: Benchmark,
    endpoint: str,
    sampling: SamplingConfig,
    seed: int,
    server: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to tell two runs apart, written next to their results (never the API key)."""
    return {
        "benchmark": benchmark.name,
        "seed": seed,
        "endpoint": endpoint,
        "model": args.model,
        "sampling": asdict(sampling),
        "options": benchmark.options,
        "judge": benchmark.judge_config(),
        "dataset": {
            "source": benchmark.source,
            "sha256": benchmark.dataset_sha256,
            "size": len(benchmark.items),
            "limit": args.limit,
        },
        "server": server,
        "mixquant_version": __version__,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


async def _run_benchmarks(
    args: argparse.Namespace,
    benchmarks: list[Benchmark],
    sampling: SamplingConfig,
    also_close: ChatClient | None = None,
) -> int:
    """Each benchmark at each seed, one after the other; the summary table at the end. Exit 1 if items failed."""
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    summary: list[tuple[str, str, dict[str, Any]]] = []
    n_failed = 0
    try:
        async with ChatClient(
            args.base_url,
            api_key,
            max_connections=args.max_concurrency,
            timeout_s=args.request_timeout,
            max_retries=args.max_retries,
        ) as client:
            server = await client.server_info(args.model)
            for benchmark in benchmarks:
                per_seed = []
                for seed in args.seeds:
                    result = await run_benchmark(
                        benchmark,
                        ModelClient(client, args.model, sampling, seed),
                        RunFiles(args.output_dir, benchmark.name, seed),
                        run_config(args, benchmark, client.base_url, sampling, seed, server),
                        limit=args.limit,
                        resume=args.resume,
                        max_concurrency=args.max_concurrency,
                    )
                    n_failed += result.n_failed
                    per_seed.append(result.metrics)
                    summary.append((benchmark.name, str(seed), result.metrics))
                if len(per_seed) > 1:
                    mean = {"benchmark": benchmark.name, **mean_over_seeds(per_seed)}
                    (args.output_dir / f"{benchmark.name}_metrics.json").write_text(json.dumps(mean, indent=2))
                    summary.append((benchmark.name, "mean", mean))
    finally:
        if also_close is not None:
            await also_close.aclose()
    print(summary_table(summary))
    if n_failed:
        print(f"\n{n_failed} item(s) failed after retries; run again with --resume to ask them again", file=sys.stderr)
    return 1 if n_failed else 0
