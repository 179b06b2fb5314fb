"""Answer extraction and scoring, on hand-written cases and on the real benchmark files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mixquant.eval.client import split_reasoning
from mixquant.eval.reasoning import DATASETS, ReasoningBenchmark
from mixquant.eval.scoring import gsm8k_gold, last_boxed, math_equal, numbers_equal, parse_choice


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\left\{ \frac{1}{2}, \sqrt{3} \right\}}", r"\left\{ \frac{1}{2}, \sqrt{3} \right\}"),
        (r"first \boxed{3}, then on reflection \boxed{\text{(C)}}", r"\text{(C)}"),
        (r"\fbox{3} and finally \boxed{4}", "4"),
        (r"The answer is $\boxed 5$.", "5"),
        (r"\boxed{10 \text{ cm}}", r"10 \text{ cm}"),
        ("no box at all: 42", None),
        (r"cut off inside the box \boxed{\frac{1}{2", None),
        ("", None),
        (None, None),
    ],
)
def test_last_boxed(response, expected):
    assert last_boxed(response) == expected


@pytest.mark.parametrize(
    ("gold", "predicted", "equal"),
    [
        (r"\frac{1}{2}", r"\frac12", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})", True),
        (r"\text{(C)}", "C", True),
        (r"\text{Evelyn}", "Evelyn", True),
        (r"\text{even}", r"\text{odd}", False),
        ("10", r"10 \text{ cm}", True),  # a unit after the number
        ("10", r"\text{10 cm}", True),  # the whole answer written as text
        (r"5.4 \text{ cents}", "5.4", True),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", True),
        (r"90^\circ", "90", True),
        (r"\$32,\!348", "32348", True),  # dollars, a thousands comma and a LaTeX thin space
        (r"\$32,\!348", "32,348", True),
        ("204", "0204", True),  # AIME answers are integers however they are padded
        ("x^2+1", "1+x^2", True),
        (r"\frac{1}{2}", r"\frac{1}{3}", False),
        ("3", "", False),
    ],
)
def test_math_equal(gold, predicted, equal):
    assert math_equal(gold, predicted) is equal


@pytest.mark.parametrize(
    ("gold", "predicted", "equal"),
    [
        ("1000", "1,000", True),
        ("18", r"\$18.00", True),
        ("18", "18 dollars", True),
        ("18", r"\text{18 dollars}", True),
        ("18", r"3 \times 6 = 18", True),
        ("-3", "-3", True),
        ("18", "17", False),
        ("18", "eighteen", False),
    ],
)
def test_numbers_equal(gold, predicted, equal):
    assert numbers_equal(gold, predicted) is equal


def test_gsm8k_gold_is_the_number_after_the_hashes():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("...\n#### 1,450,000") == "1450000"


@pytest.mark.parametrize(
    ("response", "choice"),
    [
        ("The correct answer is (B)", "B"),
        ("The correct answer is C.", "C"),
        ("**The correct answer is (D)**", "D"),
        ("The correct answer is: (A)", "A"),
        ("After weighing the evidence... Answer: (C)", "C"),
        ("answer: B", "B"),
        ("(A)", "A"),
        ("D", "D"),
        ("I first thought (A) but the correct answer is (B).", "B"),
        ("None of the choices fits.", None),
        ("", None),
    ],
)
def test_parse_choice(response, choice):
    assert parse_choice(response) == choice


def test_split_reasoning_when_the_server_leaves_think_tags_in_the_content():
    assert split_reasoning("<think>\nlet me see\n</think>\n\nThe answer is 4.", None) == (
        "The answer is 4.",
        "\nlet me see\n",
    )
    # Cut off while thinking: no answer at all, even if a box appears in the thoughts.
    assert split_reasoning(r"<think>maybe \boxed{3}", None) == ("", r"maybe \boxed{3}")
    assert split_reasoning("plain answer", "separate reasoning") == ("plain answer", "separate reasoning")


# --- the real files: gold answers fed back as responses score 1.0, shuffled ones close to 0 -----------------------

REAL_FILES = {
    "math500": "math500/test.jsonl",
    "aime24": "aime2024/aime24.jsonl",
    "aime25": "aime2025/aime25.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
}


def _written_answers(name: str, path: Path) -> list[str]:
    """The answers as the data files write them (GSM8K keeps its thousands commas), to be boxed as responses."""
    from mixquant.eval.data import read_records

    records = read_records(path)
    if name == "gsm8k":
        return [record["answer"].rsplit("####", 1)[-1].strip() for record in records]
    return [str(record["answer"]) for record in records]


def _accuracy(name: str, items, answers: list[str]) -> float:
    dataset = DATASETS[name]
    responses = [f"Reasoning done. The final answer is $\\boxed{{{answer}}}$." for answer in answers]
    scores = [
        dataset.is_correct(item.gold, last_boxed(response)) for item, response in zip(items, responses, strict=True)
    ]
    return sum(scores) / len(scores)


@pytest.mark.parametrize("name", REAL_FILES)
def test_gold_answers_score_one_and_shuffled_answers_near_zero(name, data_dir):
    path = data_dir / REAL_FILES[name]
    items = ReasoningBenchmark(DATASETS[name], path).items
    answers = _written_answers(name, path)
    assert _accuracy(name, items, answers) == 1.0
    shuffled = answers[:]
    random.Random(0).shuffle(shuffled)
    assert _accuracy(name, items, shuffled) < 0.05


def test_aime24_with_solutions_scores_the_same_answers(data_dir):
    # The Qwen2.5-Math copy zero-pads its answers ("025"); the QwQ copy has integers.
    padded = ReasoningBenchmark(DATASETS["aime24"], data_dir / "aime2024/aime24_with_solutions.jsonl").items
    plain = ReasoningBenchmark(DATASETS["aime24"], data_dir / "aime2024/aime24.jsonl").items
    assert [item.gold for item in padded] == [item.gold for item in plain]
