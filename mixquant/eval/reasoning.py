"""Math reasoning benchmarks: MATH-500, AIME 2024, AIME 2025 and GSM8K, answered in `\\boxed{}`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixquant.eval.client import ModelClient
from mixquant.eval.data import DatasetUnavailable, HubSource, load_records
from mixquant.eval.runner import Benchmark
from mixquant.eval.scoring import gsm8k_gold, last_boxed, math_equal, numbers_equal

# Qwen's own instruction for math; the QwQ AIME files already end with it, so it is stripped and added back once.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class MathProblem:
    id: str
    question: str
    gold: str
    level: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ReasoningDataset:
    name: str
    hub: HubSource
    gold_of: Callable[[dict[str, Any]], str]  # the reference answer of a raw record
    is_correct: Callable[[str, str], bool]  # (gold, extracted) -> correct
    group_keys: tuple[str, ...] = ()


def _aime_gold(record: dict[str, Any]) -> str:
    return str(int(record["answer"]))  # "025" in some copies, 25 in others


DATASETS = {
    dataset.name: dataset
    for dataset in [
        ReasoningDataset(
            "math500",
            HubSource(
                "HuggingFaceH4/MATH-500",
                split="test",
                file_hint="MATH-500's test.jsonl (openai/prm800k prm800k/math_splits/test.jsonl: "
                "problem, answer, subject, level, unique_id)",
            ),
            gold_of=lambda record: str(record["answer"]),
            is_correct=math_equal,
            group_keys=("level", "subject"),
        ),
        ReasoningDataset(
            "aime24",
            HubSource(
                "HuggingFaceH4/aime_2024",
                split="train",
                file_hint="a JSONL of the 30 AIME 2024 problems with problem (or prompt) and answer, "
                "e.g. QwenLM/QwQ eval/data/aime24.jsonl",
            ),
            gold_of=_aime_gold,
            is_correct=math_equal,
        ),
        ReasoningDataset(
            "aime25",
            HubSource(
                "math-ai/aime25",
                split="test",
                file_hint="a JSONL of the 30 AIME 2025 problems with problem (or prompt) and answer, "
                "e.g. QwenLM/QwQ eval/data/aime25.jsonl",
            ),
            gold_of=_aime_gold,
            is_correct=math_equal,
        ),
        ReasoningDataset(
            "gsm8k",
            HubSource(
                "openai/gsm8k",
                config="main",
                split="test",
                file_hint="GSM8K's test.jsonl (openai/grade-school-math grade_school_math/data/test.jsonl: "
                "question, answer ending in '#### <number>')",
            ),
            gold_of=lambda record: gsm8k_gold(record["answer"]),
            is_correct=numbers_equal,
        ),
    ]
}


def to_problem(index: int, record: dict[str, Any], dataset: ReasoningDataset) -> MathProblem:
    """One record in any of the shapes the copies of these datasets use."""
    question = next((record[key] for key in ("problem", "question", "prompt") if record.get(key)), None)
    if question is None or "answer" not in record:
        raise DatasetUnavailable(f"{dataset.name} record {index} lacks a problem/question/prompt or an answer field")
    question = question.strip().removesuffix(BOXED_INSTRUCTION).strip()
    return MathProblem(
        id=str(record.get("unique_id", record.get("id", index))),
        question=question,
        gold=dataset.gold_of(record),
        level=record.get("level"),
        subject=record.get("subject"),
    )


class ReasoningBenchmark(Benchmark):
    def __init__(self, dataset: ReasoningDataset, data_file: str | Path | None = None):
        records, source = load_records(dataset.name, data_file, dataset.hub)
        self.name = dataset.name
        self.dataset = dataset
        self.group_keys = dataset.group_keys
        super().__init__([to_problem(i, record, dataset) for i, record in enumerate(records)], source)

    async def evaluate(self, item: MathProblem, model: ModelClient, previous: dict[str, Any] | None) -> dict[str, Any]:
        prompt = f"{item.question}\n{BOXED_INSTRUCTION}"
        result = await model.ask(prompt)
        extracted = last_boxed(result.content)
        correct = extracted is not None and self.dataset.is_correct(item.gold, extracted)
        return self.answer_record(item, prompt, result, extracted, correct)
