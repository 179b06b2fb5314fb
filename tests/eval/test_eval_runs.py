"""Whole `mixquant eval` runs against scripted OpenAI-compatible servers on 127.0.0.1.

They cover bounded concurrency, retries after 500/429, --resume, the LongMemEval judge, LongBench v2 with truncation
and --cot, and the comparison of two result directories.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from pathlib import Path

import pytest

from mixquant.eval import cli as eval_cli
from mixquant.eval.longmemeval import LongMemEval
from mixquant.eval.reasoning import BOXED_INSTRUCTION, DATASETS, ReasoningBenchmark
from tests.eval.scripted_openai_server import FailFirst, Reply

NVFP4_BF16 = {"prefill_precision": "nvfp4", "decode_precision": "bf16", "nvfp4": "emulated"}


def run_eval(*argv: str | Path) -> int:
    """`mixquant eval ...` through the same argparse wiring as the `mixquant` command."""
    parser = argparse.ArgumentParser(prog="mixquant")
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(arg) for arg in argv])
    return args.func(args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_mixquant_command_has_eval():
    from mixquant.cli import build_parser

    args = build_parser().parse_args(["eval", "compare", "a", "b"])
    assert args.func is not None and args.directories == [Path("a"), Path("b")]


# --- reasoning ---------------------------------------------------------------------------------------------------


def question_of(body: dict) -> str:
    return body["messages"][-1]["content"].removesuffix(f"\n{BOXED_INSTRUCTION}")


def test_reasoning_concurrency_retries_metrics_and_config(tmp_path, data_dir, scripted_server, capsys):
    gsm8k_file, aime_file = data_dir / "gsm8k/test.jsonl", data_dir / "aime2024/aime24.jsonl"
    gsm8k = ReasoningBenchmark(DATASETS["gsm8k"], gsm8k_file).items[:24]
    aime = ReasoningBenchmark(DATASETS["aime24"], aime_file).items[:24]
    # GSM8K: 20 right (with the file's thousands commas), 2 wrong, 2 without a box. AIME: all right.
    written = {
        json.loads(line)["question"]: json.loads(line)["answer"].rsplit("####")[-1].strip()
        for line in gsm8k_file.read_text().splitlines()[:24]
    }
    # GSM8K answers come with the reasoning apart, as a reasoning parser gives it; AIME ones with <think> inline.
    replies = {item.question: Reply(rf"The total is $\boxed{{{written[item.question]}}}$.") for item in gsm8k[:20]}
    replies |= {item.question: Reply(r"\boxed{-1}") for item in gsm8k[20:22]}
    replies |= {item.question: Reply("I am not sure.") for item in gsm8k[22:]}
    for reply in replies.values():
        reply.reasoning = "thinking it through"
    replies |= {item.question: Reply(f"<think>\nadding up\n</think>\n\nSo $\\boxed{{{item.gold}}}$") for item in aime}
    for reply in replies.values():
        reply.completion_tokens = 100
    # Plain 500s wait for our own backoff; the 429s say how long to wait (not at all).
    server_errors = FailFirst(lambda question: question in {item.question for item in gsm8k[:5]}, status=500)
    rate_limits = FailFirst(
        lambda question: question in {item.question for item in aime[:2]}, status=429, retry_after="0"
    )

    def script(body: dict) -> Reply:
        question = question_of(body)
        failure = server_errors(question) or rate_limits(question)
        return failure or replies[question]

    server = scripted_server(script, precisions=NVFP4_BF16)
    out = tmp_path / "nvfp4-bf16"
    rc = run_eval(
        "eval", "reasoning", "--base-url", server.url, "--model", "scripted",  # no /v1: it is implied
        "--datasets", "gsm8k,aime24", "--data-file", f"gsm8k={gsm8k_file}", "--data-file", f"aime24={aime_file}",
        "--limit", "24", "--seeds", "1,2", "--max-concurrency", "6", "--output-dir", out,
    )  # fmt: skip
    assert rc == 0

    # Two seeds of 48 items, plus one retry for each of the 5 + 2 failures (only the first seed's request fails).
    assert len(server.requests) == 2 * 48 + 7
    assert 2 <= server.max_in_flight <= 6
    body = server.requests[0]
    assert body["model"] == "scripted" and body["messages"][-1]["content"].endswith(BOXED_INSTRUCTION)
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.6, 0.95, 20, 32768)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert {request["seed"] for request in server.requests} == {1, 2}

    metrics = read_json(out / "gsm8k_seed1_metrics.json")
    assert metrics["acc"] == pytest.approx(20 / 24)
    assert metrics["extracted_rate"] == pytest.approx(22 / 24)
    assert (metrics["avg_length"], metrics["n"], metrics["n_failed"]) == (100, 24, 0)
    assert read_json(out / "aime24_seed2_metrics.json")["acc"] == 1.0
    mean = read_json(out / "gsm8k_metrics.json")
    assert mean["seeds"] == [1, 2] and mean["acc"] == pytest.approx(20 / 24)

    records = read_jsonl(out / "gsm8k_seed1.jsonl")
    assert [record["id"] for record in records] == [item.id for item in gsm8k]  # dataset order, one line each
    first = records[0]
    assert {"id", "prompt", "response", "reasoning", "extracted", "gold", "correct", "tokens"} <= set(first)
    assert (first["gold"], first["extracted"], first["correct"], first["tokens"]) == ("18", "18", True, 100)
    assert first["reasoning"] == "thinking it through"
    aime_record = read_jsonl(out / "aime24_seed1.jsonl")[0]
    assert aime_record["reasoning"].strip() == "adding up" and aime_record["extracted"] == aime_record["gold"]

    config = read_json(out / "gsm8k_seed1_config.json")
    assert config["endpoint"] == f"{server.url}/v1" and config["model"] == "scripted"
    assert config["sampling"] == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "max_tokens": 32768,
        "enable_thinking": True,
    }
    assert config["server"]["mixquant"] == NVFP4_BF16 and config["server"]["models"] == ["scripted"]
    assert config["dataset"]["source"] == f"file:{gsm8k_file}" and config["dataset"]["size"] == 1319
    assert len(config["dataset"]["sha256"]) == 64 and config["mixquant_version"]

    summary = capsys.readouterr().out
    assert re.search(r"\| gsm8k \| mean \| 83\.3 \| 91\.7 \| 100\.0 \| 24 \|", summary)


def test_resume_asks_only_what_is_missing(tmp_path, data_dir, scripted_server, capsys):
    aime_file = data_dir / "aime2025/aime25.jsonl"
    items = ReasoningBenchmark(DATASETS["aime25"], aime_file).items[:12]
    gold = {item.question: item.gold for item in items}
    broken = {item.question for item in items[3:6]}
    outage = threading.Event()
    outage.set()

    def script(body: dict) -> Reply:
        question = question_of(body)
        if outage.is_set() and question in broken:
            return Reply(status=503)
        return Reply(rf"\boxed{{{gold[question]}}}")

    server = scripted_server(script)
    out = tmp_path / "run"
    common = ["eval", "reasoning", "--base-url", f"{server.url}/v1", "--model", "scripted", "--datasets", "aime25",
              "--data-file", aime_file, "--limit", "12", "--output-dir", out, "--max-retries", "1"]  # fmt: skip

    assert run_eval(*common) == 1  # three items failed even after a retry
    assert "3 item(s) failed" in capsys.readouterr().err
    first_run = read_jsonl(out / "aime25_seed42.jsonl")
    assert len(first_run) == 9 and not {record["id"] for record in first_run} & {item.id for item in items[3:6]}
    assert read_json(out / "aime25_seed42_metrics.json")["n_failed"] == 3
    with (out / "aime25_seed42.jsonl").open("a") as jsonl:
        jsonl.write('{"id": "half-written line of a killed run", "resp')

    # Changing the sampling under --resume would mix two experiments in one file.
    assert run_eval(*common, "--resume", "--temperature", "1.0") == 2
    assert "different model, sampling" in capsys.readouterr().err

    outage.clear()
    asked_before = len(server.requests)
    assert run_eval(*common, "--resume") == 0
    resumed_questions = [question_of(body) for body in server.requests[asked_before:]]
    assert sorted(resumed_questions) == sorted(broken)
    records = read_jsonl(out / "aime25_seed42.jsonl")
    assert [record["id"] for record in records] == [item.id for item in items]
    metrics = read_json(out / "aime25_seed42_metrics.json")
    assert (metrics["acc"], metrics["n"], metrics["n_failed"]) == (1.0, 12, 0)


def test_wrong_model_stops_the_run(tmp_path, data_dir, scripted_server, capsys):
    server = scripted_server(lambda body: Reply(status=404))
    rc = run_eval(
        "eval", "reasoning", "--base-url", server.url, "--model", "nope", "--datasets", "gsm8k",
        "--data-file", data_dir / "gsm8k/test.jsonl", "--limit", "50", "--max-concurrency", "4",
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert rc == 1 and "HTTP 404" in capsys.readouterr().err
    assert len(server.requests) < 50  # the run stopped instead of recording 50 errors


# --- LongMemEval -------------------------------------------------------------------------------------------------

JUDGE_FIELDS = re.compile(
    r"\n\n(?:Correct Answer|Rubric|Explanation): (?P<gold>.*)\n\nModel Response: (?P<response>.*)\n\n", re.DOTALL
)


def judge_script(body: dict) -> Reply:
    """A judge that says yes when the response repeats the answer, or, for an abstention, declines to answer."""
    prompt = body["messages"][-1]["content"]
    fields = JUDGE_FIELDS.search(prompt)
    if "unanswerable" in prompt:
        return Reply("Yes." if "did not mention" in fields["response"] else "No.")
    return Reply("yes" if fields["gold"] in fields["response"] else "no")


def test_longmemeval_predictions_then_judge_on_resume(tmp_path, data_dir, scripted_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "judge-key")
    data_file = data_dir / "longmemeval/longmemeval_oracle_16q_reformatted.json"
    items = LongMemEval(data_file).items
    answered = {item.question: item.gold for item in items[::2]}  # every other question answered right

    def model_script(body: dict) -> Reply:
        question = re.search(r"\nQuestion: (.*)\nAnswer \(step by step\):$", body["messages"][-1]["content"])[1]
        return Reply(f"From the history, the answer is {answered[question]}." if question in answered else "No idea.")

    model, judge = scripted_server(model_script), scripted_server(judge_script)
    out = tmp_path / "run"
    common = ["eval", "longmemeval", "--base-url", model.url, "--model", "scripted", "--data-file", data_file,
              "--output-dir", out]  # fmt: skip

    # Without a judge the answers are still written, unscored.
    assert run_eval(*common) == 0
    records = read_jsonl(out / "longmemeval_seed42.jsonl")
    assert len(records) == 16 and all(record["correct"] is None for record in records)
    assert read_json(out / "longmemeval_seed42_metrics.json")["acc"] is None
    body = model.requests[0]
    assert (body["temperature"], body["max_tokens"], body["chat_template_kwargs"]) == (
        0.0,
        800,
        {"enable_thinking": False},
    )
    assert "History Chats:" in body["messages"][0]["content"]

    # Given a judge, --resume judges the written answers without asking the model again.
    assert run_eval(*common, "--resume", "--judge-model", "judge-4o", "--judge-base-url", f"{judge.url}/v1") == 0
    assert len(model.requests) == 16 and len(judge.requests) == 16
    judge_body = judge.requests[0]
    assert judge_body["model"] == "judge-4o" and (judge_body["temperature"], judge_body["max_tokens"]) == (0.0, 10)
    assert "chat_template_kwargs" not in judge_body and "seed" not in judge_body
    assert set(judge.authorizations) == {"Bearer judge-key"}

    metrics = read_json(out / "longmemeval_seed42_metrics.json")
    assert metrics["acc"] == 0.5 and metrics["n"] == 16
    assert metrics["by_question_type"]["knowledge-update"]["n"] == 3
    config = read_json(out / "longmemeval_seed42_config.json")
    assert config["judge"] == {"model": "judge-4o", "endpoint": f"{judge.url}/v1"}
    record = read_jsonl(out / "longmemeval_seed42.jsonl")[0]
    assert record["correct"] is True and record["judge_verdict"] == "yes"


def test_longmemeval_abstention_judged_in_one_go(tmp_path, data_dir, scripted_server):
    data_file = data_dir / "longmemeval/longmemeval_s_abstention_4q_reformatted.json"

    def model_script(body: dict) -> Reply:
        question = re.search(r"\nQuestion: (.*)\nAnswer \(step by step\):$", body["messages"][-1]["content"])[1]
        declines = "hamster" in question or "Korea" in question
        return Reply("You did not mention that." if declines else "It was three years.")

    model, judge = scripted_server(model_script), scripted_server(judge_script)
    rc = run_eval(
        "eval", "longmemeval", "--base-url", model.url, "--model", "scripted", "--data-file", data_file,
        "--judge-model", "judge-4o", "--judge-base-url", judge.url, "--output-dir", tmp_path,
    )  # fmt: skip
    assert rc == 0
    assert all("unanswerable" in body["messages"][0]["content"] for body in judge.requests)
    assert read_json(tmp_path / "longmemeval_seed42_metrics.json")["acc"] == 0.5


# --- LongBench v2 ------------------------------------------------------------------------------------------------


def write_longbench(path: Path) -> list[dict]:
    cases = [("A", "easy", "short"), ("B", "easy", "medium"), ("C", "hard", "long"), ("D", "hard", "short")]
    records = [
        {
            "_id": f"lb{index}", "domain": "Long-dialogue History Understanding", "sub_domain": "Agent history QA",
            "difficulty": difficulty, "length": length, "question": f"What happened in story {index}?",
            "choice_A": "Alpha", "choice_B": "Beta", "choice_C": "Gamma", "choice_D": "Delta", "answer": answer,
            "context": f"Story {index}. " + "The day went on. " * (300 if length == "long" else 5),
        }
        for index, (answer, difficulty, length) in enumerate(cases)
    ]  # fmt: skip
    path.write_text(json.dumps(records))
    return records


def test_longbench_v2_truncates_parses_and_breaks_down(tmp_path, data_dir, scripted_server, qwen3_tokenizer):
    records = write_longbench(tmp_path / "data.json")
    gold = {f"story {index}?": record["answer"] for index, record in enumerate(records)}
    replies = {"A": "The correct answer is (A)", "B": "**The correct answer is B**", "C": "Answer: (A)", "D": "Hmm."}

    def script(body: dict) -> Reply:
        prompt = body["messages"][-1]["content"]
        return Reply(next(replies[letter] for question, letter in gold.items() if question in prompt))

    server = scripted_server(script)
    rc = run_eval(
        "eval", "longbench-v2", "--base-url", server.url, "--model", "scripted", "--data-file", tmp_path / "data.json",
        "--tokenizer", data_dir / "qwen3-tokenizer", "--max-input-tokens", "300", "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0
    prompts = server.prompts()
    assert max(len(qwen3_tokenizer.encode(prompt, add_special_tokens=False)) for prompt in prompts) <= 302
    long_prompt = next(prompt for prompt in prompts if "story 2?" in prompt)
    assert long_prompt.startswith("Read the text below") and long_prompt.endswith("letter of your choice.")
    assert (server.requests[0]["temperature"], server.requests[0]["max_tokens"]) == (0.1, 128)

    metrics = read_json(tmp_path / "out/longbench-v2_seed42_metrics.json")
    assert (metrics["acc"], metrics["extracted_rate"]) == (0.5, 0.75)
    assert metrics["by_difficulty"] == {"easy": {"acc": 1.0, "n": 2}, "hard": {"acc": 0.0, "n": 2}}
    assert metrics["by_length"]["short"] == {"acc": 0.5, "n": 2}
    config = read_json(tmp_path / "out/longbench-v2_seed42_config.json")
    assert config["options"] == {"cot": False, "max_input_tokens": 300, "tokenizer": str(data_dir / "qwen3-tokenizer")}


def test_longbench_v2_cot_answers_in_a_second_request(tmp_path, data_dir, scripted_server):
    records = write_longbench(tmp_path / "data.json")

    def script(body: dict) -> Reply:
        prompt = body["messages"][-1]["content"]
        if "Step-by-step reasoning about the text:" in prompt:  # the second request
            letter = re.search(r"so it must be ([A-D])\.", prompt)[1]
            return Reply(f"The correct answer is ({letter})", completion_tokens=5)
        index = int(re.search(r"story (\d)\?", prompt)[1])
        return Reply(f"Reading carefully, so it must be {records[index]['answer']}.", completion_tokens=50)

    server = scripted_server(script)
    rc = run_eval(
        "eval", "longbench-v2", "--base-url", server.url, "--model", "scripted", "--data-file", tmp_path / "data.json",
        "--tokenizer", data_dir / "qwen3-tokenizer", "--cot", "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0 and len(server.requests) == 8
    assert {body["max_tokens"] for body in server.requests} == {1024}
    record = read_jsonl(tmp_path / "out/longbench-v2_seed42.jsonl")[0]
    assert record["cot"].startswith("Reading carefully") and record["tokens"] == 55 and record["correct"] is True


# --- compare -----------------------------------------------------------------------------------------------------


def test_compare_two_precision_pairs(tmp_path, data_dir, scripted_server, capsys):
    aime_file = data_dir / "aime2024/aime24.jsonl"
    items = ReasoningBenchmark(DATASETS["aime24"], aime_file).items[:10]
    gold = {item.question: item.gold for item in items}
    runs = {"bf16": (1.0, {"prefill_precision": "bf16", "decode_precision": "bf16", "nvfp4": None}),
            "nvfp4": (0.8, NVFP4_BF16)}  # fmt: skip
    for name, (accuracy, precisions) in runs.items():
        right = {item.question for item in items[: int(accuracy * len(items))]}

        def script(body: dict, right=right) -> Reply:
            question = question_of(body)
            return Reply(rf"\boxed{{{gold[question] if question in right else 0}}}")

        server = scripted_server(script, precisions=precisions)
        rc = run_eval(
            "eval", "reasoning", "--base-url", server.url, "--model", "scripted", "--datasets", "aime24",
            "--data-file", aime_file, "--limit", "10", "--seeds", "1,2", "--output-dir", tmp_path / name,
        )  # fmt: skip
        assert rc == 0
    capsys.readouterr()

    assert run_eval("eval", "compare", tmp_path / "bf16", tmp_path / "nvfp4", "--output", tmp_path / "cmp") == 0
    table = capsys.readouterr().out
    assert "| benchmark (acc %) | bf16 (bf16/bf16) | nvfp4 (nvfp4/bf16) |" in table
    assert "| aime24 | 100.0 | 80.0 (-20.0) |" in table
    assert (tmp_path / "cmp.md").read_text().startswith("| benchmark (acc %)")
    assert (tmp_path / "cmp.png").read_bytes().startswith(b"\x89PNG")


def test_compare_rejects_a_directory_without_results(tmp_path, capsys):
    assert run_eval("eval", "compare", tmp_path) == 2
    assert "no *_seed*_metrics.json" in capsys.readouterr().err
