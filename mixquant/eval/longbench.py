"""LongBench v2: 503 four-choice questions over contexts of 8k to 2M words, truncated in the middle to a token budget.

The prompts keep the layout of the official templates (THUDM/LongBench, prompts/0shot*.txt) in our own words: the
document inside <text> tags, the question, the four choices, and the answer sentence the letter is parsed from.
With --cot, as in the official pred.py, a second request turns the step-by-step reasoning into that sentence.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mixquant.eval.client import ModelClient
from mixquant.eval.data import DatasetUnavailable, HubSource, load_records
from mixquant.eval.runner import Benchmark
from mixquant.eval.scoring import parse_choice
from mixquant.eval.text import PromptBudget

HUB = HubSource(
    "THUDM/LongBench-v2",
    split="train",
    file_hint="LongBench v2's data.json (the HF dataset THUDM/LongBench-v2: _id, domain, sub_domain, difficulty, "
    "length, question, choice_A..choice_D, answer, context)",
)
ANSWER_FORMAT = 'Reply in exactly this form: "The correct answer is (X)", where X is the letter of your choice.'


@dataclass
class LongBenchItem:
    id: str
    question: str
    choices: dict[str, str]  # letter -> text
    gold: str  # the correct letter
    context: str
    difficulty: str  # easy / hard
    length: str  # short / medium / long
    domain: str


def to_item(record: dict[str, Any]) -> LongBenchItem:
    try:
        return LongBenchItem(
            id=str(record["_id"]),
            question=record["question"].strip(),
            choices={letter: record[f"choice_{letter}"].strip() for letter in "ABCD"},
            gold=record["answer"].strip(),
            context=record["context"].strip(),
            difficulty=record["difficulty"],
            length=record["length"],
            domain=record.get("domain", ""),
        )
    except KeyError as error:
        raise DatasetUnavailable(f"LongBench v2 record lacks the field {error}; expected {HUB.file_hint}") from None


def _question_block(item: LongBenchItem) -> str:
    choices = "\n".join(f"({letter}) {text}" for letter, text in item.choices.items())
    return f"Question: {item.question}\nChoices:\n{choices}"


def _with_document(document: str) -> str:
    return (
        f"Read the text below, then answer the multiple-choice question that follows it.\n\n<text>\n{document}\n</text>"
    )


def direct_prompt(item: LongBenchItem) -> str:
    return f"{_with_document(item.context)}\n\n{_question_block(item)}\n\n{ANSWER_FORMAT}"


def cot_prompt(item: LongBenchItem) -> str:
    return (
        f"{_with_document(item.context)}\n\n{_question_block(item)}\n\nThink it through step by step before you choose."
    )


def cot_answer_prompt(item: LongBenchItem, chain_of_thought: str) -> str:
    # The second step sees the reasoning, not the document again: it only has to turn the reasoning into a letter.
    return (
        "Answer the multiple-choice question below. The text it is about was shown earlier and is left out here.\n\n"
        f"{_question_block(item)}\n\nStep-by-step reasoning about the text: {chain_of_thought}\n\n"
        f"From that reasoning, pick the single most likely choice. {ANSWER_FORMAT}"
    )


class LongBenchV2(Benchmark):
    name = "longbench-v2"
    group_keys = ("difficulty", "length")

    def __init__(self, budget: PromptBudget, cot: bool = False, data_file: str | Path | None = None):
        records, source = load_records(self.name, data_file, HUB)
        self.budget = budget
        self.cot = cot
        super().__init__([to_item(record) for record in records], source, {"cot": cot, **budget.options()})

    async def evaluate(
        self, item: LongBenchItem, model: ModelClient, previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        template = cot_prompt if self.cot else direct_prompt
        # Tokenizing a million-word context takes seconds: keep it off the event loop so that requests keep flowing.
        prompt = await asyncio.to_thread(self.budget.fit, template(item))
        result = await model.ask(prompt)
        extra: dict[str, Any] = {}
        if self.cot:
            chain = result
            result = await model.ask(cot_answer_prompt(item, chain.content))
            extra = {"cot": chain.content, "cot_reasoning": chain.reasoning}
            if chain.completion_tokens is not None and result.completion_tokens is not None:
                result = replace(result, completion_tokens=chain.completion_tokens + result.completion_tokens)
        extracted = parse_choice(result.content)
        return self.answer_record(item, prompt, result, extracted, extracted == item.gold, **extra)
