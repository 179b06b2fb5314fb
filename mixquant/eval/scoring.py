"""Answer extraction and scoring: the last `\\boxed{}` for math, "The correct answer is (X)" for multiple choice."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
# Spacing commands carry no meaning in an answer but make math-verify see "32,\!348" as something else than 32348.
_LATEX_SPACING = re.compile(r"\\[!,;:]|\\q?quad")
# "5.4 \text{ cents}", "270/7 \text{ degrees}": a unit written after a number is not part of the value.
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}\s*$")
# "\text{10 cm}": the whole answer written as text; keep the number.
_NUMBER_IN_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(-?[\d.,]+)\s*[A-Za-z .]*\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_boxed(text: str | None) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None when there is none."""
    if not text:
        return None
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    box = _BOX_OPENING.match(text, start)
    if box.group(1) is None:  # the brace-less form, `\boxed 5`
        bare = re.match(r"[^\s$]+", text[box.end() :])
        return bare.group(0) if bare else None
    depth = 1
    for i in range(box.end(), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[box.end() : i].strip()
    return None  # the box was never closed: the response was cut off inside it


def normalize_math_answer(answer: str) -> str:
    """Strip what math-verify should not have to understand: dollar signs, spacing commands, trailing units."""
    answer = answer.replace("\\$", "").replace("$", "")
    answer = _LATEX_SPACING.sub("", answer)
    answer = _TRAILING_UNIT.sub("", answer)
    answer = _NUMBER_IN_TEXT.sub(r"\1", answer)
    return answer.strip()


def math_equal(gold: str, predicted: str) -> bool:
    """Mathematical equivalence as math-verify decides it (fractions, intervals, tuples, symbolic forms)."""
    # Imported here: math-verify pulls in sympy, which commands that never compare math answers need not load
    # (and the GPU machines' image does not have it).
    from math_verify import parse, verify

    # Wrapping in \boxed{} makes math-verify read the whole string as one answer instead of searching it for one.
    gold_parsed = parse(f"\\boxed{{{normalize_math_answer(gold)}}}")
    predicted_parsed = parse(f"\\boxed{{{normalize_math_answer(predicted)}}}")
    return bool(gold_parsed) and bool(predicted_parsed) and verify(gold_parsed, predicted_parsed)


def last_number(text: str) -> float | None:
    """The last number in the text once thousands separators, currency and LaTeX spacing are gone."""
    text = normalize_math_answer(text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def numbers_equal(gold: str, predicted: str) -> bool:
    """GSM8K answers are plain numbers, so compare them as numbers ("1,000", "$18.00" and "18 dollars" included)."""
    gold_value, predicted_value = last_number(gold), last_number(predicted)
    return gold_value is not None and predicted_value is not None and abs(gold_value - predicted_value) < 1e-6


def gsm8k_gold(solution: str) -> str:
    """GSM8K solutions end with `#### <answer>`."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


# LongBench v2 asks for "The correct answer is (X)"; models also write "The correct answer is: B", "Answer: (C)", "D".
_CHOICE_PATTERNS = [
    re.compile(r"(?i:correct answer is)\s*:?\s*\(?([A-D])\b\)?"),
    re.compile(r"(?i:answer)\s*(?:is)?\s*:?\s*\(([A-D])\)"),
    re.compile(r"(?i:answer)\s*(?:is)?\s*:\s*([A-D])\b"),
    re.compile(r"^\s*\(?([A-D])\)?[.\s]*$"),
]


def parse_choice(response: str | None) -> str | None:
    """The chosen letter (A-D) of a multiple-choice response, from the first pattern that matches (its last match)."""
    if not response:
        return None
    response = response.replace("*", "")  # markdown bold around the answer
    for pattern in _CHOICE_PATTERNS:
        matches = pattern.findall(response)
        if matches:
            return matches[-1]
    return None
