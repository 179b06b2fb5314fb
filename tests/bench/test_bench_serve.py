"""`mixquant bench serve`: the workloads' shape, the timings against a server with known delays, the CLI, and one
run against a real mixquant server (tiny model, CPU)."""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from mixquant.bench.serve import (
    LOWEST_TOKEN_ID,
    TOP_MARGIN,
    AgenticWorkload,
    MetricSample,
    RandomWorkload,
    RequestRecord,
    prefix_cache_hit_rate,
    server_time_means,
    run_serve_benchmark,
    summarize,
)
from mixquant.cli import main
from tests.bench.streaming_server import StreamingServer

SMALL = {"sessions": 3, "turns": 4, "system_tokens": 40, "first_context_tokens": 100, "tool_tokens": (20, 30),
         "output_tokens": 5}


@pytest.fixture
def streaming_server() -> Iterator[Callable[..., StreamingServer]]:
    servers: list[StreamingServer] = []

    def start(**kwargs: Any) -> StreamingServer:
        servers.append(StreamingServer(**kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def all_prompts(workload: AgenticWorkload) -> dict[tuple[int, int], list[int]]:
    return {(s, t): workload.prompt(s, t) for s in range(workload.sessions) for t in range(workload.turns)}


# ---- workloads -----------------------------------------------------------------------------------------------------

def test_agentic_workload_is_deterministic_per_seed_and_differs_across_seeds():
    assert all_prompts(AgenticWorkload(**SMALL, seed=3)) == all_prompts(AgenticWorkload(**SMALL, seed=3))
    a, b = all_prompts(AgenticWorkload(**SMALL, seed=0)), all_prompts(AgenticWorkload(**SMALL, seed=1))
    assert all(a[key] != b[key] for key in a)
    assert RandomWorkload(seed=5).request(7) == RandomWorkload(seed=5).request(7)
    assert RandomWorkload(seed=5).request(7) != RandomWorkload(seed=6).request(7)


def test_sessions_share_the_system_prefix_and_each_turn_extends_the_last():
    workload = AgenticWorkload(**SMALL)
    prompts = all_prompts(workload)
    system = workload.system_prompt()
    assert len(system) == SMALL["system_tokens"]
    for (session, turn), prompt in prompts.items():
        assert prompt[:len(system)] == system
        if turn + 1 < workload.turns:
            assert prompts[session, turn + 1][:len(prompt)] == prompt
    # Only the system prompt is shared: each session's own context starts right after it.
    firsts = [prompts[s, 0][len(system)] for s in range(workload.sessions)]
    assert len(set(firsts)) == workload.sessions


def test_prompt_lengths_follow_the_configuration():
    workload = AgenticWorkload(**SMALL)
    for session in range(workload.sessions):
        lengths = [len(workload.prompt(session, turn)) for turn in range(workload.turns)]
        assert lengths[0] == SMALL["system_tokens"] + SMALL["first_context_tokens"]
        for before, after in itertools.pairwise(lengths):
            assert 5 + 20 <= after - before <= 5 + 30  # a reply of output_tokens plus a tool output
    tool_lengths = {len(workload.tool_output(s, t)) for s in range(3) for t in range(4)}
    assert len(tool_lengths) > 1 and min(tool_lengths) >= 20 and max(tool_lengths) <= 30
    ids = np.concatenate([workload.prompt(s, workload.turns - 1) for s in range(workload.sessions)])
    assert ids.min() >= LOWEST_TOKEN_ID and ids.max() < 151000 - TOP_MARGIN < 151643  # ordinary Qwen3 tokens
    # A reply the server cut short is stood in for by as many tokens as it had.
    assert len(workload.next_prompt([1], 0, 0, 2)) == 1 + 2 + len(workload.tool_output(0, 0))


def test_default_agentic_workload_is_about_100_to_1():
    workload = AgenticWorkload()
    prompt_tokens = sum(len(workload.prompt(0, turn)) for turn in range(workload.turns))
    ratio = prompt_tokens / (workload.turns * workload.output_tokens)
    assert 80 < ratio < 120


def test_random_workload_lengths_stay_in_range():
    workload = RandomWorkload(num_requests=50, input_len_range=(10, 20), output_len_range=(3, 4), seed=1)
    requests = [workload.request(i) for i in range(50)]
    assert {len(prompt) for prompt, _ in requests} <= set(range(10, 21))
    assert {max_tokens for _, max_tokens in requests} == {3, 4}


def test_invalid_workloads_are_refused():
    with pytest.raises(ValueError, match="tool_tokens"):
        AgenticWorkload(tool_tokens=(10, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        AgenticWorkload(vocab_size=1500)
    with pytest.raises(ValueError, match="num_requests"):
        RandomWorkload(num_requests=0)


# ---- statistics ----------------------------------------------------------------------------------------------------

def test_summary_statistics_from_known_timings():
    records = [
        RequestRecord(index=i, session=i, turn=0, prompt_len=100, max_tokens=4, start_s=0.0, end_s=1.0,
                      ttft_s=ttft, itl_s=[0.1, 0.2, 0.3], chunks=4, prompt_tokens=100, completion_tokens=4)
        for i, ttft in enumerate([0.1, 0.2, 0.3, 0.4])
    ]
    records.append(RequestRecord(index=4, session=4, turn=0, prompt_len=100, max_tokens=4, start_s=0.0, end_s=9.0,
                                 error="HTTP 500: boom"))
    summary = summarize(records, total_time_s=2.0)
    assert summary["requests"] == 4 and summary["failed_requests"] == 1
    assert summary["ttft_p50_s"] == pytest.approx(0.25)
    assert summary["ttft_p99_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 99))
    assert summary["itl_p50_s"] == pytest.approx(0.2) and summary["itl_p99_s"] == pytest.approx(0.3)
    assert summary["tpot_p50_s"] == pytest.approx((1.0 - 0.25) / 3)  # (e2e - ttft) / (4 - 1)
    assert summary["e2e_p50_s"] == pytest.approx(1.0)  # the failed request's 9 s is not counted
    assert summary["input_output_ratio"] == pytest.approx(25.0)
    assert summary["output_tokens_per_s"] == pytest.approx(8.0)
    assert summary["total_tokens_per_s"] == pytest.approx(208.0)
    assert summary["tokens_per_chunk"] == pytest.approx(1.0)
    assert summary["errors"] == ["HTTP 500: boom"]


def test_prefix_hit_rate_comes_from_counter_deltas():
    def scrape(hits: float, queries: float, prefix: str = "vllm:") -> list[MetricSample]:
        # two served names: each counter is summed over its label sets
        return [MetricSample(f"{prefix}prefix_cache_hits_total", {"model_name": name}, hits / 2) for name in "ab"] + [
            MetricSample(f"{prefix}prefix_cache_queries_total", {"model_name": name}, queries / 2) for name in "ab"]

    assert prefix_cache_hit_rate(scrape(100, 1000), scrape(400, 1400)) == pytest.approx(0.75)
    assert prefix_cache_hit_rate(scrape(0, 0, "vllm:gpu_"), scrape(30, 60, "vllm:gpu_")) == pytest.approx(0.5)
    assert prefix_cache_hit_rate(scrape(5, 10), scrape(5, 10)) is None  # nothing was looked up
    assert prefix_cache_hit_rate(None, scrape(5, 10)) is None
    assert prefix_cache_hit_rate([], []) is None


def test_server_queue_and_prefill_means_come_from_histogram_deltas():
    def scrape(queue_sum, prefill_sum, count):
        return [MetricSample(f"vllm:request_{phase}_time_seconds_{part}", {"model_name": "m"}, value)
                for phase, total in (("queue", queue_sum), ("prefill", prefill_sum))
                for part, value in (("sum", total), ("count", count))]

    means = server_time_means(scrape(1.0, 2.0, 4), scrape(4.0, 4.0, 10))
    assert means == {"queue_time_mean_s": pytest.approx(0.5), "prefill_time_mean_s": pytest.approx(2 / 6)}
    assert server_time_means(scrape(1.0, 2.0, 4), scrape(1.0, 2.0, 4)) == dict.fromkeys(means)  # none finished
    assert server_time_means([], scrape(1.0, 1.0, 1)) == {"queue_time_mean_s": 1.0, "prefill_time_mean_s": 1.0}
    assert server_time_means(None, None) == dict.fromkeys(means)
    assert server_time_means([], []) == dict.fromkeys(means)  # a server without these histograms


# ---- against a server with known delays ----------------------------------------------------------------------------

def session_of(workload: AgenticWorkload, prompt: list[int]) -> int:
    firsts = [workload.first_prompt(s) for s in range(workload.sessions)]
    return next(s for s, first in enumerate(firsts) if prompt[:len(first)] == first)


def test_agentic_run_against_a_streaming_server(streaming_server):
    precisions = {"prefill_precision": "fp8", "decode_precision": "bf16"}
    server = streaming_server(first_token_delay_s=0.05, token_delay_s=0.01, precisions=precisions)
    workload = AgenticWorkload(**SMALL)
    summary = run_serve_benchmark(f"{server.url}/v1", "scripted", workload)

    # The server got exactly the planned prompts, with the fields that make the lengths and timings mean something.
    assert summary["requests"] == 12 and summary["failed_requests"] == 0
    received = sorted(server.received, key=lambda r: r.arrived)
    got = {(session_of(workload, r.prompt), len(r.prompt)): r.prompt for r in received}
    planned = {(s, len(p)): p for (s, _), p in all_prompts(workload).items()}
    assert got == planned
    body = received[0].body
    assert (body["model"], body["max_tokens"], body["temperature"], body["ignore_eos"], body["stream"]) == (
        "scripted", 5, 0, True, True)
    assert body["stream_options"] == {"include_usage": True}

    # Concurrency: sessions overlap, but a session's next turn is sent only after its last one finished.
    by_session: dict[int, list] = {}
    for r in received:
        by_session.setdefault(session_of(workload, r.prompt), []).append(r)
    for turns in by_session.values():
        assert len(turns) == workload.turns
        assert all(later.arrived >= earlier.finished for earlier, later in itertools.pairwise(turns))
    first_turns = [turns[0] for turns in by_session.values()]
    assert max(r.arrived for r in first_turns) < min(r.finished for r in first_turns)

    # Timings against the server's delays (loose upper bounds: two shared CPU cores).
    assert 0.05 <= summary["ttft_p50_s"] < 0.09
    assert summary["ttft_p99_s"] >= summary["ttft_p50_s"]
    assert 0.009 <= summary["itl_p50_s"] < 0.02
    assert 0.009 <= summary["itl_p99_s"] < 0.06
    assert 0.009 <= summary["tpot_p50_s"] < 0.02
    assert 0.05 + 4 * 0.01 <= summary["e2e_p50_s"] < 0.2
    assert summary["tokens_per_chunk"] == 1.0
    assert summary["completion_tokens"] == 12 * 5
    assert summary["prompt_tokens"] == sum(len(r.prompt) for r in received)
    assert summary["input_output_ratio"] == pytest.approx(summary["prompt_tokens"] / 60)
    assert summary["output_tokens_per_s"] == pytest.approx(60 / summary["total_time_s"])

    # Prefix-cache hit rate from the counters' deltas over the run, not their totals.
    expected = (server.cache_hits - 1234) / (server.cache_queries - 5000)
    assert summary["prefix_cache_hit_rate"] == pytest.approx(expected)
    assert 0.5 < expected < 1

    assert summary["server_precisions"] == precisions and summary["server_version"] == "scripted-1"
    assert summary["workload"] == {"mode": "agentic", **SMALL, "seed": 0, "vocab_size": 151000}
    rows = summary["per_request"]
    assert len(rows) == 12 and {(row["session"], row["turn"]) for row in rows} == {
        (s, t) for s in range(3) for t in range(4)}
    assert all(row["kind"] == "serve_request" and row["tokens_per_s"] > 0 for row in rows)
    assert len(summary["ttft_p50_s_by_turn"]) == 4


def test_random_mode_keeps_to_max_concurrency_and_reports_no_hit_rate_without_metrics(streaming_server):
    server = streaming_server(first_token_delay_s=0.02, token_delay_s=0.001, with_metrics=False)
    workload = RandomWorkload(num_requests=12, input_len_range=(8, 16), output_len_range=(2, 4), seed=2)
    summary = run_serve_benchmark(server.url, "scripted", workload, max_concurrency=3)
    assert summary["requests"] == 12
    assert sorted(len(r.prompt) for r in server.received) == sorted(len(workload.request(i)[0]) for i in range(12))
    events = sorted([(r.arrived, 1) for r in server.received] + [(r.finished, -1) for r in server.received])
    in_flight = np.cumsum([step for _, step in events])
    assert in_flight.max() == 3
    assert summary["prefix_cache_hit_rate"] is None and summary["server_precisions"] is None
    assert "ttft_p50_s_by_turn" not in summary


def test_failed_requests_are_counted_and_a_wrong_model_stops_the_run(streaming_server):
    server = streaming_server(fail=lambda body: 500 if body["max_tokens"] == 3 else None,
                              break_midway=lambda body: body["max_tokens"] == 4)
    workload = RandomWorkload(num_requests=12, input_len_range=(4, 8), output_len_range=(2, 4), seed=0)
    summary = run_serve_benchmark(server.url, "scripted", workload)
    lengths = [workload.request(i)[1] for i in range(12)]
    assert lengths.count(2) and lengths.count(3) and lengths.count(4)
    assert summary["failed_requests"] == 12 - lengths.count(2) and summary["requests"] == lengths.count(2)
    assert [error.split(":")[0] for error in summary["errors"]] == ["HTTP 500", "stream error"]
    assert summary["completion_tokens"] == 2 * lengths.count(2)  # the broken streams' first tokens are not counted

    server = streaming_server(fail=lambda body: 404)
    from mixquant.eval.client import EndpointError

    with pytest.raises(EndpointError, match="404"):
        run_serve_benchmark(server.url, "nope", AgenticWorkload(**SMALL))
    assert len(server.received) == 0


# ---- command line --------------------------------------------------------------------------------------------------

def test_cli_prints_a_table_and_writes_summary_rows_and_requests(streaming_server, tmp_path, capsys):
    server = streaming_server(precisions={"prefill_precision": "fp8", "decode_precision": "bf16"})
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", server.url, "--model", "scripted", "--sessions", "2", "--turns", "2",
            "--system-tokens", "16", "--first-context", "32", "--tool-tokens", "8,12", "--output-tokens", "3",
            "--seed", "4", "--output", str(out)]
    assert main(argv) == 0
    assert "TTFT p50" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["summary"]["workload"]["seed"] == 4 and result["summary"]["requests"] == 4
    [row] = result["rows"]
    assert row["kind"] == "serve" and (row["prefill_precision"], row["decode_precision"]) == ("fp8", "bf16")
    assert row["ttft_p50_s"] > 0 and row["itl_p99_s"] > 0 and row["tokens_per_s"] > 0
    assert len(result["requests"]) == 4 and "per_request" not in result["summary"]
    assert sorted(len(r.prompt) for r in server.received)[:2] == [48, 48]  # 16 + 32 on turn 0

    argv = ["bench", "serve", "--base-url", f"{server.url}/v1/", "--model", "scripted", "--mode", "random",
            "--num-requests", "3", "--input-len", "5", "--output-len", "2,3"]
    assert main(argv) == 0
    assert main(argv[:-2] + ["--output-len", "3,2"]) == 2  # an empty range is refused before anything is sent


# ---- against a real mixquant server --------------------------------------------------------------------------------

def test_against_a_mixquant_server(tiny_qwen3):
    from tests.server.conftest import MODEL_NAME, running_server, server_config, tiny_engine

    engine = tiny_engine(tiny_qwen3)
    workload = AgenticWorkload(sessions=2, turns=3, system_tokens=48, first_context_tokens=40, tool_tokens=(16, 24),
                               output_tokens=4)
    with running_server(engine, server_config(tiny_qwen3)) as server:
        summary = run_serve_benchmark(server.url, MODEL_NAME, workload, api_key=server.api_key)
    assert summary["failed_requests"] == 0 and summary["requests"] == 6
    # A loaded CPU may have the server merge two decode steps into one chunk, so chunks are not counted here.
    assert summary["completion_tokens"] == 6 * 4
    assert 0 < summary["tpot_p50_s"] <= summary["tpot_p99_s"]
    assert summary["prompt_tokens"] == sum(len(p) for p in all_prompts(workload).values())
    # Turns after the first reuse at least the previous prompt's full 16-token blocks.
    assert summary["prefix_cache_hit_rate"] is not None and summary["prefix_cache_hit_rate"] > 0.3
    # the server's own split of TTFT: queue and prefill, within the client's mean TTFT (measured beyond the server)
    queue, prefill = summary["queue_time_mean_s"], summary["prefill_time_mean_s"]
    assert queue >= 0 and prefill > 0
    mean_ttft = sum(r["ttft_s"] for r in summary["per_request"]) / len(summary["per_request"])
    assert queue + prefill <= mean_ttft
    precisions = engine.config.describe_precisions()
    assert summary["server_precisions"]["prefill_precision"] == precisions["prefill_precision"]
    assert summary["server_precisions"]["decode_precision"] == precisions["decode_precision"]
