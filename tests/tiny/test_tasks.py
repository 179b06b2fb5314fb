"""The task generator and the tokenizer of mixquant-tiny (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from mixquant.tiny import bundled_model_path, tasks
from tests.data import QWEN3_TOKENIZER
from training.tokenizer import MARKUP_TOKENS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_model_path()))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generator_is_deterministic_per_seed(task):
    first = [tasks.generate(task, seed).to_row() for seed in range(5)]
    assert first == [tasks.generate(task, seed).to_row() for seed in range(5)]
    assert len({json.dumps(row) for row in first}) == 5  # seeds give different examples
    assert tasks.heldout(task, 5) == [tasks.generate(task, seed) for seed in range(5)]


def test_generator_is_the_same_in_every_process():
    # string hashing differs per process (PYTHONHASHSEED): nothing may depend on a set's iteration order
    script = ("import hashlib, json; from mixquant.tiny import tasks; print(hashlib.sha256(json.dumps("
              "[e.to_row() for t in tasks.TASKS for e in tasks.heldout(t, 20)]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1


def test_answers_follow_from_the_prompt():
    arithmetic = tasks.generate("arithmetic", 7)
    statements = arithmetic.messages[0]["content"].split("Track the variables. ")[1].split(" What is ")[0]
    values = {}
    for statement in statements.rstrip(".").split(". "):
        name, expression = statement.split(" = ")
        values[name] = eval(expression, {}, dict(values))  # noqa: S307 - our own generated arithmetic
    target = arithmetic.messages[0]["content"].split(" What is ")[1].split("?")[0]
    assert arithmetic.answer == f"\\boxed{{{values[target]}}}"

    single = 0
    for retrieval in tasks.heldout("retrieval", 40):
        lines = retrieval.messages[1]["content"].splitlines()
        question, records = lines[-1], [line for line in lines if line.startswith("record ")]
        # each answer quotes records as their lines read (first letter capitalised), from the key asked by on
        quotes = [q[0].lower() + q[1:] for q in retrieval.answer.rstrip(".").split(". ")]
        assert all(any(q in r for r in records) for q in quotes)
        field = next((f for f in ("value of record", "name on record", "city is") if f in question), None)
        if field:
            single += 1
            key = question.split(field + " ")[1].removesuffix("?").removesuffix(" in")
            [line] = [r for r in records if quotes[0] in r]
            assert key in line and len(quotes) == 1
            asked = field.split()[0] if field != "city is" else "city"
            assert quotes[0].split(f"{asked} ")[-1] == line.split(f"{asked} ")[1].split(",")[0]
    assert single > 20

    call = tasks.generate("tool_use", 0, stage="call")
    name = json.loads(call.answer)["name"]
    assert name in [t["function"]["name"] for t in call.tools]
    assert call.messages[-1]["tool_calls"][0]["function"]["name"] == name


def test_short_record_lists_for_the_training_curriculum():
    for count in (1, 2, 3):
        for seed in range(10):
            e = tasks.generate("retrieval", tasks.TRAIN_SEED_BASE + seed, max_records=count)
            lines = [r for r in e.messages[1]["content"].splitlines() if r.startswith("record ")]
            assert len(lines) == count
            quotes = [q[0].lower() + q[1:] for q in e.answer.rstrip(".").split(". ")]
            assert all(any(q in line for line in lines) for q in quotes)
    assert {e.meta["records"] for e in tasks.heldout("retrieval", 40)} <= set(range(4, 191))


def test_multi_turn_recalls_a_fact_of_the_session():
    for seed in range(20):
        example = tasks.generate("multi_turn", seed)
        history = " ".join(m["content"] for m in example.messages[:-2] if m.get("content"))
        # the answer restates something said (or returned by a tool) earlier in the session
        assert any(token in history for token in example.answer.rstrip(".").split()[-2:])


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        tasks.generate("chess", 0)


def test_tokenizer_special_and_markup_tokens(tokenizer):
    for token in SPECIAL_TOKENS + MARKUP_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    # markup survives skip_special_tokens (the parsers look for it in the text); the chat specials do not
    assert tokenizer.decode(ids["input_ids"], skip_special_tokens=True) == \
        "<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"


@pytest.mark.parametrize("task", tasks.TASKS)
def test_tokenizer_round_trips_generated_text(tokenizer, task):
    example = tasks.generate(task, 11)
    text = tokenizer.apply_chat_template(example.messages, tools=example.tools, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer)


def test_chat_template_is_qwen3s(tokenizer):
    qwen3 = json.loads((QWEN3_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    assert tokenizer.chat_template == qwen3
