"""Runs one benchmark at one seed: bounded concurrency, records streamed to JSONL, --resume, metrics at the end."""

from __future__ import annotations

import asyncio
import json
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mixquant.eval.client import ChatResult, EndpointError, ModelClient
from mixquant.eval.data import fingerprint
from mixquant.eval.metrics import accuracy, summarize
from mixquant.eval.text import abbreviate_middle

# The prompt kept in each record: LongBench and LongMemEval prompts run to hundreds of thousands of characters.
PROMPT_CHARS_KEPT = 4000


class ResumeMismatch(Exception):
    """--resume on results produced with a different model, sampling, dataset or prompt options."""


class Benchmark(ABC):
    """A dataset, how each item is asked and scored, and which record fields its accuracy is broken down by.

    Items are dataclasses with at least `id` and `gold`.
    """

    name: str
    group_keys: tuple[str, ...] = ()

    def __init__(self, items: list[Any], source: str, options: dict[str, Any] | None = None):
        self.items = items
        self.source = source
        self.options = options or {}  # settings that change the prompts: recorded, and must match on --resume
        self.dataset_sha256 = fingerprint(items)

    @abstractmethod
    async def evaluate(self, item: Any, model: ModelClient, previous: dict[str, Any] | None) -> dict[str, Any]:
        """Ask the item and return its record. `previous` is the record a resumed run already holds for it, if any."""

    def is_complete(self, record: dict[str, Any]) -> bool:
        """Whether a record from an earlier run can stand, or the item must be evaluated again on --resume."""
        return True

    def judge_config(self) -> dict[str, Any] | None:
        """The judge that scores answers, for benchmarks that use one (recorded; free to change on --resume)."""
        return None

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return summarize(records, self.group_keys)

    def base_record(self, item: Any) -> dict[str, Any]:
        return {"id": item.id, "gold": item.gold, **{key: getattr(item, key) for key in self.group_keys}}

    def answer_record(
        self, item: Any, prompt: str, result: ChatResult, extracted: str | None, correct: bool | None, **extra: Any
    ) -> dict[str, Any]:
        """The JSONL line for one answered item."""
        return {
            **self.base_record(item),
            "prompt": abbreviate_middle(prompt, PROMPT_CHARS_KEPT),
            "response": result.content,
            "reasoning": result.reasoning,
            "extracted": extracted,
            "correct": correct,
            "tokens": result.completion_tokens,
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            **extra,
        }


@dataclass
class RunFiles:
    """`<dir>/<benchmark>_seed<seed>.jsonl` with the records, `..._config.json` and `..._metrics.json` beside it."""

    output_dir: Path
    benchmark: str
    seed: int

    def _path(self, suffix: str) -> Path:
        return self.output_dir / f"{self.benchmark}_seed{self.seed}{suffix}"

    @property
    def records(self) -> Path:
        return self._path(".jsonl")

    @property
    def config(self) -> Path:
        return self._path("_config.json")

    @property
    def metrics(self) -> Path:
        return self._path("_metrics.json")


@dataclass
class RunResult:
    metrics: dict[str, Any]
    n_failed: int  # items that still failed after all retries; a --resume run asks them again


def _resume_signature(config: dict[str, Any]) -> tuple[Any, ...]:
    # What makes earlier answers comparable with new ones; the endpoint may move and the judge may change.
    return config.get("model"), config.get("sampling"), config.get("options"), config.get("dataset", {}).get("sha256")


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records by id; a later line for the same id replaces an earlier one (a re-judged answer)."""
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
            records[record["id"]] = record
    return records


async def run_benchmark(
    benchmark: Benchmark,
    model: ModelClient,
    files: RunFiles,
    config: dict[str, Any],
    *,
    limit: int | None,
    resume: bool,
    max_concurrency: int,
) -> RunResult:
    items = benchmark.items[:limit] if limit else benchmark.items
    files.output_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    if resume and files.config.exists():
        previous_config = json.loads(files.config.read_text())
        if _resume_signature(previous_config) != _resume_signature(config):
            raise ResumeMismatch(
                f"{files.records} was produced with a different model, sampling, dataset or prompt options "
                f"(see {files.config}); use another --output-dir or run without --resume"
            )
        records = load_records(files.records)
    else:
        files.records.unlink(missing_ok=True)
    files.config.write_text(json.dumps(config, indent=2, ensure_ascii=False))

    pending = [item for item in items if item.id not in records or not benchmark.is_complete(records[item.id])]
    semaphore = asyncio.Semaphore(max_concurrency)
    progress = tqdm(
        total=len(items), initial=len(items) - len(pending), desc=f"{benchmark.name} seed {model.seed}", mininterval=1.0
    )

    async def evaluate(item: Any) -> dict[str, Any] | None:
        async with semaphore:
            try:
                return await benchmark.evaluate(item, model, records.get(item.id))
            except EndpointError as error:
                if error.fatal:
                    raise
                if error.retryable:  # gave up after all retries: leave it out so that --resume asks it again
                    progress.write(f"{benchmark.name} {item.id}: failed after retries: {error}", file=sys.stderr)
                    return None
                # The server rejects this request (e.g. a prompt over its context length): asking again won't help.
                return {**benchmark.base_record(item), "error": str(error), "extracted": None, "correct": False}

    n_failed = 0
    tasks = [asyncio.create_task(evaluate(item)) for item in pending]
    try:
        with files.records.open("a", encoding="utf-8") as out:
            for next_finished in asyncio.as_completed(tasks):
                record = await next_finished
                if record is None:
                    n_failed += 1
                    continue
                records[record["id"]] = record
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                progress.update(1)
                running = accuracy(list(records.values()))
                if running is not None:
                    progress.set_postfix_str(f"acc={running:.3f}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.close()

    _rewrite_in_order(files.records, records, [item.id for item in items])
    answered = [records[item.id] for item in items if item.id in records]
    metrics = {"benchmark": benchmark.name, "seed": model.seed, **benchmark.metrics(answered), "n_failed": n_failed}
    files.metrics.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    return RunResult(metrics, n_failed)


def _rewrite_in_order(path: Path, records: dict[str, dict[str, Any]], order: list[str]) -> None:
    """One line per item in dataset order (records arrive in completion order, re-judged ones twice)."""
    in_dataset = set(order)
    ordered_ids = [item_id for item_id in order if item_id in records]
    ordered_ids += [item_id for item_id in records if item_id not in in_dataset]  # from a run with a larger --limit
    temporary = path.with_suffix(".jsonl.tmp")
    with temporary.open("w", encoding="utf-8") as out:
        for item_id in ordered_ids:
            out.write(json.dumps(records[item_id], ensure_ascii=False) + "\n")
    temporary.replace(path)
