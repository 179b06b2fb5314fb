"""`mixquant fidelity` end to end on the tiny random model (CPU)."""
from __future__ import annotations

import json

import pytest

from mixquant.cli import main
from mixquant.fidelity.cli import DEFAULT_MAX_TOKENS, default_max_tokens
from mixquant.fidelity.run import is_correct
from mixquant.tiny import tasks

PROMPTS = [{"prompt": "Records: id 1 value 7, id 2 value 9. Value of id 2?", "answer": "9"},
           {"prompt": "Compute 2 + 2 and box it.", "answer": "4"},
           {"messages": [{"role": "user", "content": "Say hello to the tool."}]}]
MAX_TOKENS = 6


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    return path


def test_fidelity_against_bf16(tiny_qwen3, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fidelity", str(tiny_qwen3), "--pairs", "bf16/bf16,fp8/bf16,nvfp4/nvfp4", "--prompts",
                 str(prompts_file), "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--device", "cpu",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "fidelity.json").read_text())
    pairs = result["pairs"]
    assert list(pairs) == ["bf16/bf16", "fp8/bf16", "nvfp4/nvfp4"]
    assert list(pairs["bf16/bf16"]) == ["all"]  # three short prompts: one length bucket
    # the self-check: the reference measured again against itself
    ref = pairs["bf16/bf16"]["all"]
    assert (ref["kl_mean"], ref["kl_p99"], ref["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert ref["first_divergence_mean"] == MAX_TOKENS
    assert ref["n"] == 3 and ref["accuracy_n"] == 2 and len(ref["accuracy_ci95"]) == 2
    for pair in ("fp8/bf16", "nvfp4/nvfp4"):
        stats = pairs[pair]["all"]
        assert stats["kl_p99"] >= stats["kl_mean"] > 0
        assert 0 <= stats["top1_agreement"] <= 1 and 0 <= stats["first_divergence_mean"] <= MAX_TOKENS
    # NVFP4 everywhere strays further than an FP8 prefill alone
    assert pairs["nvfp4/nvfp4"]["all"]["kl_mean"] > pairs["fp8/bf16"]["all"]["kl_mean"]
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "fidelity.md").read_text()
    assert "| fp8/bf16 | all | 3 |" in table and "| bf16/bf16 | all | 3 | 0 | 0 | 1.000 | 6.0 |" in table
    captured = capsys.readouterr()
    assert table.strip() in captured.out
    # a random model never reaches an answer in 6 tokens: the table and stderr say so instead of a silent 0
    assert ref["accuracy"] == 0 and ref["accuracy_cut_off"] == 2
    warning = "bf16/bf16 all: 2 of 2 graded generations reached the 6-token limit before an answer"
    assert warning in table and f"mixquant fidelity: warning: {warning}" in captured.err


def test_buckets_tasks_and_default_reference(tiny_qwen3, tmp_path):
    # a prompt of >= 512 tokens puts prompts in two buckets; --tasks adds graded prompts; no bf16/bf16 asked for
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "word " * 600 + "Repeat the last word:", "answer": "word"}) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    out = tmp_path / "out"
    assert main(["fidelity", str(tiny_qwen3), "--pairs", "fp8/bf16", "--prompts", str(prompts), "--tasks",
                 str(tasks), "--max-tokens", "2", "--dtype", "float32", "--device", "cpu",
                 "--output-dir", str(out)]) == 0
    pairs = json.loads((out / "fidelity.json").read_text())["pairs"]
    assert list(pairs) == ["bf16/bf16", "fp8/bf16"]
    assert list(pairs["fp8/bf16"]) == ["all", "<512", "512-2k"]
    assert pairs["fp8/bf16"]["<512"]["accuracy"] is None and pairs["fp8/bf16"]["512-2k"]["accuracy_n"] == 1


@pytest.mark.parametrize("content,argv,message", [
    (None, ["--pairs", "fp8/int4"], "bad pair 'fp8/int4'"),
    (None, ["--pairs", "fp8"], "bad pair 'fp8'"),
    (None, ["--prompts", "/does/not/exist.jsonl"], "/does/not/exist.jsonl does not exist"),
    ("\n\n", ["--prompts", "{file}"], "holds no prompts"),
    ('{"text": "hi"}\n', ["--prompts", "{file}"], "line 1: needs a 'prompt' string or a 'messages' list"),
    ('{"prompt": "hi"}\nnot json\n', ["--prompts", "{file}"], "line 2: not JSON"),
    ('{"prompt": "hi", "answer": 4}\n', ["--prompts", "{file}"], "'answer' must be a string"),
    ('{"prompt": "hi"}\n', ["--tasks", "{file}"], "line 1: a task needs a gold 'answer'"),
    (None, ["--tasks", "tiny", "--task-count", "0"], "--task-count must be >= 1"),
    ('{"messages": [], "tools": {}}\n', ["--prompts", "{file}"], "'tools' must be a list"),
    ('{"prompt": "hi", "chat_template_kwargs": {}}\n', ["--prompts", "{file}"],
     "'chat_template_kwargs' must be a dict, next to 'messages'"),
    ('{"prompt": "hi", "task": "two words"}\n', ["--prompts", "{file}"], "'task' must be a name"),
    (None, ["--max-tokens", "0"], "--max-tokens must be >= 1"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, content, argv, message):
    file = tmp_path / "input.jsonl"
    if content is not None:
        file.write_text(content)
    argv = [a.replace("{file}", str(file)) for a in argv]
    # the model does not exist: inputs are checked before anything loads
    assert main(["fidelity", str(tmp_path / "no-model"), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixquant fidelity: ") and message in err


def test_the_tiny_task_set_brings_its_own_budget():
    assert default_max_tokens("tiny") == tasks.MAX_REPLY_TOKENS > DEFAULT_MAX_TOKENS
    assert default_max_tokens(None) == default_max_tokens("tasks.jsonl") == DEFAULT_MAX_TOKENS


def test_accuracy_rule():
    assert is_correct(" The value is 9.", " 9 ")
    assert is_correct("so the answer is \\boxed{\\frac{1}{2}}", "0.5")  # boxed, mathematically equal
    assert not is_correct("so the answer is \\boxed{3}", "0.5")
    assert not is_correct("", "9")


def test_fidelity_on_a_moe_model(tiny_qwen3_moe, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert main(["fidelity", str(tiny_qwen3_moe), "--pairs", "fp8/bf16,nvfp4/bf16", "--prompts", str(prompts_file),
                 "--max-tokens", "4", "--dtype", "float32", "--device", "cpu", "--output-dir", str(out)]) == 0
    pairs = json.loads((out / "fidelity.json").read_text())["pairs"]
    for pair in ("fp8/bf16", "nvfp4/bf16"):
        assert pairs[pair]["all"]["kl_mean"] > 0 and pairs[pair]["all"]["n"] == 3
