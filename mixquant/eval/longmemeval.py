"""LongMemEval: questions about a user's chat history, answered from the whole history and judged by an LLM.

Reads both shapes the data comes in: the original LongMemEval schema (one record per question, with
`haystack_sessions` and `haystack_dates`) and the flattened "reformatted" one (a `conversation` of dated turns plus
its `questions`). The history prompt and the judge criteria follow the official code (xiaowu0162/LongMemEval,
src/generation/run_generation.py with full-history sessions, JSON turns and step-by-step reading, and
src/evaluation/evaluate_qa.py) in our own words.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixquant.eval.client import ModelClient
from mixquant.eval.data import DatasetUnavailable, load_records
from mixquant.eval.runner import Benchmark
from mixquant.eval.text import PromptBudget


@dataclass
class Session:
    date: str  # "2023/05/20 (Sat) 02:21": sorts chronologically as a string
    turns: list[dict[str, str]]  # {"role", "content"}


@dataclass
class MemoryQuestion:
    id: str
    question: str
    gold: str
    question_type: str
    question_date: str
    sessions: list[Session]
    is_abstention: bool  # the history does not hold the answer; the right response says so


def _turns(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    # Only what the user and the assistant said: `has_answer` flags and per-turn dates would give the answer away.
    return [{"role": turn["role"], "content": turn["content"]} for turn in turns]


def from_original(record: dict[str, Any]) -> MemoryQuestion:
    sessions = [
        Session(date, _turns(turns))
        for date, turns in zip(record["haystack_dates"], record["haystack_sessions"], strict=True)
    ]
    return MemoryQuestion(
        id=str(record["question_id"]),
        question=record["question"],
        gold=str(record["answer"]),
        question_type=record["question_type"],
        question_date=record["question_date"],
        sessions=sessions,
        is_abstention="_abs" in str(record["question_id"]),  # how the official evaluation tells them apart
    )


def from_reformatted(record: dict[str, Any]) -> list[MemoryQuestion]:
    # Session boundaries were flattened away; consecutive turns that share a date are one session.
    sessions = [
        Session(date, _turns(list(turns)))
        for date, turns in itertools.groupby(record["conversation"], key=lambda turn: turn["date"])
    ]
    # The question date was dropped too: the question comes after the latest session.
    question_date = max(session.date for session in sessions)
    return [
        MemoryQuestion(
            id=f"{record['id']}/{question['id']}",
            question=question["question"],
            gold=str(question["answer"]),
            question_type=record["question_type"],
            question_date=question_date,
            sessions=sessions,
            is_abstention=bool(question.get("is_abstention")) or "_abs" in str(record["id"]),
        )
        for question in record["questions"]
    ]


def to_questions(records: list[dict[str, Any]]) -> list[MemoryQuestion]:
    questions: list[MemoryQuestion] = []
    for index, record in enumerate(records):
        if "haystack_sessions" in record:
            questions.append(from_original(record))
        elif "conversation" in record:
            questions.extend(from_reformatted(record))
        else:
            raise DatasetUnavailable(
                f"LongMemEval record {index} has neither haystack_sessions (original schema) "
                "nor conversation (reformatted schema)"
            )
    return questions


def history_prompt(item: MemoryQuestion) -> str:
    history = "".join(
        f"\n### Session {number}:\nSession Date: {session.date}\nSession Content:\n"
        f"{json.dumps(session.turns, ensure_ascii=False)}\n"
        for number, session in enumerate(sorted(item.sessions, key=lambda session: session.date), start=1)
    )
    return (
        "Below are earlier chat sessions between you and a user. Answer the user's question from the relevant "
        "parts of that history. Work step by step: first pull out every relevant piece of information, then "
        f"reason over it to reach the answer.\n\n\nHistory Chats:\n{history}\n"
        f"Current Date: {item.question_date}\nQuestion: {item.question}\nAnswer (step by step):"
    )


_JUDGE_TASK = (
    "You will see a question, the correct answer and a model's response. Answer yes if the response contains the "
    "correct answer, and no otherwise. A response that is equivalent to the correct answer, or that contains all the "
    "intermediate steps leading to it, is also correct; one that gives only part of the required information is not."
)
# Criteria added for the question types where "contains the correct answer" is not the whole story.
_JUDGE_EXTRA_CRITERIA = {
    "temporal-reasoning": (
        " Do not penalize off-by-one errors in a number of days, weeks or months: if the question asks for such a "
        "count and the response is off by one (19 days for 18, say), it is still correct."
    ),
    "knowledge-update": (
        " If the response mentions earlier information along with the updated one, it is correct as long as the "
        "updated answer is the one asked for."
    ),
}
_PREFERENCE_JUDGE = (
    "You will see a question, a rubric describing the personalized response the user wants, and a model's response. "
    "Answer yes if the response satisfies the rubric, and no otherwise. It does not have to reflect every point of "
    "the rubric: it is correct as long as it recalls and uses the user's personal information correctly."
    "\n\nQuestion: {question}\n\nRubric: {gold}\n\nModel Response: {response}\n\n"
    "Is the model response correct? Answer yes or no only."
)
_ABSTENTION_JUDGE = (
    "You will see a question that cannot be answered from the user's history, an explanation of why, and a model's "
    "response. Answer yes if the model recognizes that the question cannot be answered: it may say that the "
    "information is missing, or that related information was given but not the one asked for."
    "\n\nQuestion: {question}\n\nExplanation: {gold}\n\nModel Response: {response}\n\n"
    "Does the model correctly identify the question as unanswerable? Answer yes or no only."
)


def judge_prompt(item: MemoryQuestion, response: str) -> str:
    if item.is_abstention:
        template = _ABSTENTION_JUDGE
    elif item.question_type == "single-session-preference":
        template = _PREFERENCE_JUDGE
    else:
        template = (
            _JUDGE_TASK
            + _JUDGE_EXTRA_CRITERIA.get(item.question_type, "")
            + "\n\nQuestion: {question}\n\nCorrect Answer: {gold}\n\nModel Response: {response}\n\n"
            "Is the model response correct? Answer yes or no only."
        )
    return template.format(question=item.question, gold=item.gold, response=response)


class LongMemEval(Benchmark):
    name = "longmemeval"
    group_keys = ("question_type",)

    def __init__(self, data_file: str | Path, judge: ModelClient | None = None, budget: PromptBudget | None = None):
        records, source = load_records(self.name, data_file, hub=None)
        self.judge = judge
        self.budget = budget
        super().__init__(to_questions(records), source, budget.options() if budget else {})

    def judge_config(self) -> dict[str, Any] | None:
        if self.judge is None:
            return None
        return {"model": self.judge.model, "endpoint": self.judge.client.base_url}

    def is_complete(self, record: dict[str, Any]) -> bool:
        # An answer written without a judge is judged (not asked again) once a judge is given.
        return record.get("correct") is not None or self.judge is None

    async def evaluate(
        self, item: MemoryQuestion, model: ModelClient, previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        if previous is not None:  # answered in an earlier run, not judged yet
            record = previous
        else:
            prompt = history_prompt(item)
            if self.budget is not None:
                prompt = await asyncio.to_thread(self.budget.fit, prompt)
            result = await model.ask(prompt)
            # There is nothing to extract: the judge reads the whole answer. None marks a response cut off in thought.
            record = self.answer_record(
                item, prompt, result, result.content or None, correct=None, is_abstention=item.is_abstention
            )
        if self.judge is not None:
            verdict = await self.judge.ask(judge_prompt(item, record["response"]))
            record = {**record, "judge_verdict": verdict.content, "correct": "yes" in verdict.content.lower()}
        return record
