"""Loading every dataset shape: the local files, both LongMemEval schemas, LongBench v2's layout, the hub fallback."""

from __future__ import annotations

import json
import sys

import pytest

from mixquant.eval.data import DatasetUnavailable, HubSource, load_records
from mixquant.eval.longbench import LongBenchV2, cot_answer_prompt, direct_prompt
from mixquant.eval.longmemeval import LongMemEval, history_prompt, judge_prompt
from mixquant.eval.reasoning import BOXED_INSTRUCTION, DATASETS, ReasoningBenchmark
from mixquant.eval.text import PromptBudget


@pytest.mark.parametrize(
    ("name", "path", "size"),
    [
        ("math500", "math500/test.jsonl", 500),
        ("aime24", "aime2024/aime24.jsonl", 30),
        ("aime24", "aime2024/aime24_with_solutions.jsonl", 30),
        ("aime25", "aime2025/aime25.jsonl", 30),
        ("gsm8k", "gsm8k/test.jsonl", 1319),
    ],
)
def test_reasoning_files_load(name, path, size, data_dir):
    benchmark = ReasoningBenchmark(DATASETS[name], data_dir / path)
    assert len(benchmark.items) == size
    assert len({item.id for item in benchmark.items}) == size
    assert all(item.question and item.gold for item in benchmark.items)
    # The QwQ AIME prompts end with Qwen's instruction; it is added back once, at ask time.
    assert not any(item.question.endswith(BOXED_INSTRUCTION) for item in benchmark.items)
    assert benchmark.source.startswith("file:")
    assert len(benchmark.dataset_sha256) == 64


def test_math500_keeps_level_and_subject(data_dir):
    first = ReasoningBenchmark(DATASETS["math500"], data_dir / "math500/test.jsonl").items[0]
    assert (first.id, first.level, first.subject) == ("test/precalculus/807.json", 2, "Precalculus")


def test_hub_without_datasets_package_names_the_file_to_pass(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as when `datasets` is not installed
    with pytest.raises(DatasetUnavailable) as error:
        load_records("gsm8k", None, DATASETS["gsm8k"].hub)
    message = str(error.value)
    assert "openai/gsm8k" in message and "--data-file" in message and "grade_school_math/data/test.jsonl" in message


def test_hub_unreachable_names_the_file_to_pass(monkeypatch):
    class OfflineDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets)
    hub = HubSource("THUDM/LongBench-v2", split="train", file_hint="data.json")
    with pytest.raises(DatasetUnavailable, match=r"no network.*--data-file with data\.json"):
        load_records("longbench-v2", None, hub)


def test_missing_data_file_is_reported(tmp_path):
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        load_records("gsm8k", tmp_path / "nope.jsonl", None)


# --- LongMemEval ---------------------------------------------------------------------------------------------------


def test_longmemeval_original_schema(data_dir):
    items = LongMemEval(data_dir / "longmemeval/longmemeval_s_cleaned_trimmed_2q.json").items
    assert [item.id for item in items] == ["e47becba", "118b2229"]
    first = items[0]
    assert first.question_date == "2023/05/30 (Tue) 23:40"
    assert [len(session.turns) for session in first.sessions] == [2, 4, 4]
    assert first.gold == "Business Administration" and not first.is_abstention
    prompt = history_prompt(first)
    assert "Session Date: 2023/05/20 (Sat) 02:21" in prompt
    assert prompt.rstrip().endswith(
        "Current Date: 2023/05/30 (Tue) 23:40\nQuestion: What degree did I graduate with?\nAnswer (step by step):"
    )


def test_longmemeval_reformatted_schema(data_dir):
    items = LongMemEval(data_dir / "longmemeval/longmemeval_oracle_16q_reformatted.json").items
    assert len(items) == 16
    by_id = {item.id: item for item in items}
    temporal = by_id["temporal-rea-gpt4_74aed68e/q3"]
    # Sessions rebuilt from the flat turns (one per date), and the question asked after the latest one.
    assert [session.date for session in temporal.sessions] == ["2023/02/14 (Tue) 12:45", "2023/03/15 (Wed) 10:20"]
    assert temporal.question_date == "2023/03/15 (Wed) 10:20"
    assert all(set(turn) == {"role", "content"} for session in temporal.sessions for turn in session.turns)
    assert by_id["multi-sessio-bf659f65/q5"].gold == "3"  # an integer answer in the file
    prompt = history_prompt(temporal)
    assert prompt.index("2023/02/14") < prompt.index("2023/03/15")


def test_longmemeval_abstention_questions(data_dir):
    items = LongMemEval(data_dir / "longmemeval/longmemeval_s_abstention_4q_reformatted.json").items
    assert len(items) == 4 and all(item.is_abstention for item in items)
    assert "unanswerable" in judge_prompt(items[0], "I don't know")


def test_judge_prompt_criteria_per_question_type(data_dir):
    items = {
        item.question_type: item
        for item in LongMemEval(data_dir / "longmemeval/longmemeval_oracle_16q_reformatted.json").items
    }
    assert "off-by-one" in judge_prompt(items["temporal-reasoning"], "x")
    assert "updated answer" in judge_prompt(items["knowledge-update"], "x")
    assert "Rubric:" in judge_prompt(items["single-session-preference"], "x")
    plain = judge_prompt(items["multi-session"], "my response")
    assert "Correct Answer: 3" in plain and "Model Response: my response" in plain
    assert "off-by-one" not in plain and "Rubric" not in plain


# --- LongBench v2 ----------------------------------------------------------------------------------------------------


def longbench_record(index: int, context: str, answer: str = "B", difficulty: str = "easy", length: str = "short"):
    """A record in LongBench v2's field layout (the HF dataset THUDM/LongBench-v2)."""
    return {
        "_id": f"66f36490821e116aacb2{index:04d}",
        "domain": "Single-Document QA",
        "sub_domain": "Academic",
        "difficulty": difficulty,
        "length": length,
        "question": f"Which statement about item {index} is right?",
        "choice_A": "The first.",
        "choice_B": "The second.",
        "choice_C": "The third.",
        "choice_D": "The fourth.",
        "answer": answer,
        "context": context,
    }


@pytest.fixture
def longbench_file(tmp_path):
    long_context = "BEGINNING OF THE DOCUMENT. " + " ".join(f"word{i}" for i in range(3000)) + " END OF THE DOCUMENT."
    records = [
        longbench_record(0, "A short document.", "A", "easy", "short"),
        longbench_record(1, long_context, "C", "hard", "long"),
        longbench_record(2, "Another short one.", "D", "hard", "medium"),
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_longbench_prompt_and_middle_truncation(longbench_file, qwen3_tokenizer):
    budget = PromptBudget(qwen3_tokenizer, "qwen3", max_tokens=500)
    benchmark = LongBenchV2(budget, data_file=longbench_file)
    assert [item.gold for item in benchmark.items] == ["A", "C", "D"]
    assert benchmark.options == {"cot": False, "max_input_tokens": 500, "tokenizer": "qwen3"}

    short = direct_prompt(benchmark.items[0])
    assert budget.fit(short) == short
    assert "<text>\nA short document.\n</text>" in short
    assert "(A) The first.\n(B) The second.\n(C) The third.\n(D) The fourth." in short
    assert short.endswith('"The correct answer is (X)", where X is the letter of your choice.')

    long = direct_prompt(benchmark.items[1])
    fitted = budget.fit(long)
    assert len(qwen3_tokenizer.encode(fitted, add_special_tokens=False)) <= 502  # re-tokenizing at the seam may merge
    # The instructions at the start and the question at the end survive; the middle of the document goes.
    assert fitted.startswith("Read the text below") and "BEGINNING OF THE DOCUMENT" in fitted
    assert fitted.endswith(short[short.index("Reply in exactly") :])
    assert "word1500 " not in fitted

    second_step = cot_answer_prompt(benchmark.items[1], "Step 1: the document says C.")
    assert "word10 " not in second_step and "Step 1: the document says C." in second_step


def test_longbench_layout_errors_name_the_expected_fields(tmp_path, qwen3_tokenizer):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"_id": "x", "question": "q"}]))
    with pytest.raises(DatasetUnavailable, match="choice_A"):
        LongBenchV2(PromptBudget(qwen3_tokenizer, "qwen3", 100), data_file=path)
