"""`mixquant bench serve`: drive a running OpenAI-compatible server with agent-shaped traffic and time it.

The agentic workload replays what a coding or browsing agent sends: `sessions` conversations run concurrently, each
`turns` requests long and strictly sequential (an agent waits for the model before it calls its next tool). Every
session starts from one system prompt shared by all sessions plus a first context of its own; each turn adds the
model's reply and a tool result of 1-2k tokens and asks for about 200 new tokens, so the input:output ratio lands
near 100:1 and nearly every prompt token but the newest is a prefix-cache hit. The random workload is the usual
independent-requests baseline with uniformly drawn lengths.

Prompts are sent as token ids to /v1/completions, so their lengths are exact whatever the tokenizer would merge, and
they are a pure function of the workload and its seed: two servers (bf16 vs fp8 prefill, mixquant vs vLLM) are
given the same prompts. The one thing a real agent does that this cannot is resend the model's own reply: its
token ids are not in the stream, and they would differ between servers anyway. Each turn's reply is therefore
replaced, in later prompts, by a seeded block of synthetic ids as long as the reply was. The server's cache then
misses those ~200 tokens per turn, where a real agent's resent reply would hit (see docs/bench-serve.md).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from mixquant.eval.client import ChatClient, EndpointError, normalize_base_url

# Prompt ids come from [LOWEST_TOKEN_ID, vocab_size - TOP_MARGIN): the lowest ids of byte-level BPE vocabularies
# are single bytes, and special tokens sit at the top (Qwen3's start at 151643), so both ends are left out and
# every id is an ordinary text token.
LOWEST_TOKEN_ID = 1000
TOP_MARGIN = 1000
DEFAULT_VOCAB_SIZE = 151000

# Independent random streams, one per kind of block, so that a block's ids depend only on (seed, kind, session,
# turn) and not on the order in which concurrent sessions happen to ask for them.
_SYSTEM, _CONTEXT, _REPLY, _TOOL, _TOOL_LENGTH, _RANDOM = range(6)

# (hits, queries) counter names, newest first: vLLM >= 0.10 and mixquant, then the older vLLM V1 names.
PREFIX_CACHE_COUNTERS = [
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
    ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
]
ENGINE_INFO_METRIC = "mixquant:engine_info"  # a mixquant server's precisions, as labels


def _token_ids(seed: int, vocab_size: int, stream: tuple[int, ...], length: int) -> list[int]:
    rng = np.random.default_rng([seed, *stream])
    return rng.integers(LOWEST_TOKEN_ID, vocab_size - TOP_MARGIN, size=length).tolist()


def _check_range(name: str, bounds: tuple[int, int], lowest: int) -> None:
    low, high = bounds
    if not lowest <= low <= high:
        raise ValueError(f"{name} must be (low, high) with {lowest} <= low <= high, got {bounds}")


def _check_common(seed: int, vocab_size: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if vocab_size <= LOWEST_TOKEN_ID + TOP_MARGIN:
        raise ValueError(f"vocab_size must be > {LOWEST_TOKEN_ID + TOP_MARGIN}, got {vocab_size}")


@dataclass
class AgenticWorkload:
    """Concurrent agent sessions whose prompts grow turn by turn from a shared system prompt (see module doc).

    Turn 0's prompt is the system prompt followed by the session's first context; turn t+1's prompt is turn t's
    followed by turn t's reply (synthetic ids, as long as the reply was) and turn t's tool output.
    """

    mode: ClassVar[str] = "agentic"

    sessions: int = 16
    turns: int = 12
    system_tokens: int = 1024
    first_context_tokens: int = 8192
    tool_tokens: tuple[int, int] = (1024, 2048)  # each tool output's length, uniform over [low, high]
    output_tokens: int = 200
    seed: int = 0
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self) -> None:
        self.tool_tokens = tuple(self.tool_tokens)
        for name in ("sessions", "turns", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.system_tokens < 0 or self.first_context_tokens < 0 or self.system_tokens + self.first_context_tokens < 1:
            raise ValueError("system_tokens and first_context_tokens must be >= 0 and not both 0")
        _check_range("tool_tokens", self.tool_tokens, 0)
        _check_common(self.seed, self.vocab_size)

    @property
    def num_requests(self) -> int:
        return self.sessions * self.turns

    def _ids(self, stream: tuple[int, ...], length: int) -> list[int]:
        return _token_ids(self.seed, self.vocab_size, stream, length)

    def system_prompt(self) -> list[int]:
        return self._ids((_SYSTEM,), self.system_tokens)

    def first_context(self, session: int) -> list[int]:
        return self._ids((_CONTEXT, session), self.first_context_tokens)

    def reply(self, session: int, turn: int, length: int) -> list[int]:
        """The synthetic stand-in for turn `turn`'s reply, cut to the `length` tokens the server generated."""
        return self._ids((_REPLY, session, turn), self.output_tokens)[:length]

    def tool_output(self, session: int, turn: int) -> list[int]:
        length = int(np.random.default_rng([self.seed, _TOOL_LENGTH, session, turn]).integers(
            self.tool_tokens[0], self.tool_tokens[1] + 1))
        return self._ids((_TOOL, session, turn), length)

    def first_prompt(self, session: int) -> list[int]:
        return self.system_prompt() + self.first_context(session)

    def next_prompt(self, prompt: list[int], session: int, turn: int, generated: int) -> list[int]:
        """Turn `turn + 1`'s prompt, from turn `turn`'s prompt and the number of tokens its reply had."""
        return prompt + self.reply(session, turn, generated) + self.tool_output(session, turn)

    def prompt(self, session: int, turn: int) -> list[int]:
        """Turn `turn`'s prompt when every earlier reply ran to `output_tokens` (as `ignore_eos` makes it)."""
        prompt = self.first_prompt(session)
        for earlier in range(turn):
            prompt = self.next_prompt(prompt, session, earlier, self.output_tokens)
        return prompt

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, **asdict(self)}


@dataclass
class RandomWorkload:
    """Independent requests with input and output lengths drawn uniformly from their ranges (inclusive)."""

    mode: ClassVar[str] = "random"

    num_requests: int = 128
    input_len_range: tuple[int, int] = (1024, 8192)
    output_len_range: tuple[int, int] = (64, 256)
    seed: int = 0
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self) -> None:
        self.input_len_range = tuple(self.input_len_range)
        self.output_len_range = tuple(self.output_len_range)
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        _check_range("input_len_range", self.input_len_range, 1)
        _check_range("output_len_range", self.output_len_range, 1)
        _check_common(self.seed, self.vocab_size)

    def request(self, index: int) -> tuple[list[int], int]:
        """Request `index`'s prompt ids and max_tokens."""
        rng = np.random.default_rng([self.seed, _RANDOM, index])
        input_len = int(rng.integers(self.input_len_range[0], self.input_len_range[1] + 1))
        output_len = int(rng.integers(self.output_len_range[0], self.output_len_range[1] + 1))
        return _token_ids(self.seed, self.vocab_size, (_RANDOM, index, 1), input_len), output_len

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, **asdict(self)}


Workload = AgenticWorkload | RandomWorkload


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds since the run started (perf_counter)."""

    index: int  # order of issue within the run
    session: int | None  # None in the random workload
    turn: int | None
    prompt_len: int  # token ids sent
    max_tokens: int
    start_s: float
    end_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between successive token chunks
    chunks: int = 0  # stream chunks that carried a choice, i.e. generated tokens
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: unlike ITL, right however many tokens each chunk carried."""
        if not self.ok or self.ttft_s is None or (self.completion_tokens or 0) < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def row(self) -> dict[str, Any]:
        """The per-request line of the JSON output (the gaps themselves reduced to their percentiles)."""
        return {
            "kind": "serve_request",
            "index": self.index,
            "session": self.session,
            "turn": self.turn,
            "start_s": self.start_s,
            "ttft_s": self.ttft_s,
            "itl_p50_s": _percentile(self.itl_s, 50),
            "itl_p99_s": _percentile(self.itl_s, 99),
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": self.completion_tokens / self.e2e_s if self.ok and self.e2e_s > 0 else None,
            "error": self.error,
        }


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class _Client:
    """Streams completions and records each one's timings; at most `max_concurrency` in flight when given."""

    def __init__(self, http: httpx.AsyncClient, model: str, max_concurrency: int | None, progress: Any):
        self.http = http
        self.model = model
        self.limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.started = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def complete(self, prompt: list[int], max_tokens: int, session: int | None, turn: int | None
                       ) -> RequestRecord:
        # Encoded before the clock starts: for a 30k-token prompt this is milliseconds that are not the server's.
        body = json.dumps({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every reply runs to max_tokens, so output lengths are the workload's
            "stream": True,
            "stream_options": {"include_usage": True},
        }).encode()
        async with self.limit:
            # The clock starts once the request may go out: waiting for a concurrency slot is the client's doing.
            record = RequestRecord(index=len(self.records), session=session, turn=turn, prompt_len=len(prompt),
                                   max_tokens=max_tokens, start_s=self.now())
            self.records.append(record)
            try:
                await self._stream(body, record)
            except EndpointError as error:
                if error.fatal:  # a wrong key, model or URL: every other request would fail the same way
                    raise
                record.error = str(error)
            except httpx.HTTPError as error:  # refused, reset or timed out
                record.error = f"{type(error).__name__}: {error}"
            except ValueError as error:
                record.error = f"malformed stream chunk: {error}"
            record.end_s = self.now()
        if self.progress is not None:
            self.progress.update(1)
        return record

    async def _stream(self, body: bytes, record: RequestRecord) -> None:
        token_times: list[float] = []
        usage: dict[str, Any] = {}
        async with self.http.stream("POST", "/completions", content=body,
                                    headers={"Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise EndpointError(f"HTTP {response.status_code}: {text[:500]}", status=response.status_code,
                                    retryable=False)
            async for line in response.aiter_lines():
                arrived = self.now()  # before parsing, so the client's own JSON work is not counted
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                # A failure midway arrives as an event: {"error": {...}} (mixquant, newer vLLM) or {"object": "error"}.
                if "error" in chunk or chunk.get("object") == "error":
                    raise EndpointError(f"stream error: {data[:500]}", status=200, retryable=False)
                # vLLM and mixquant send a chunk per decode step, i.e. per token (its text may be empty while the
                # detokenizer waits for the rest of a character), unless the client falls behind and the server
                # merges steps; `tokens_per_chunk` in the summary tells. The final usage chunk has no choices.
                if chunk.get("choices"):
                    token_times.append(arrived)
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if not token_times:
            raise EndpointError("the stream ended without a token", status=200, retryable=False)
        record.ttft_s = token_times[0] - record.start_s
        record.itl_s = np.diff(token_times).tolist()
        record.chunks = len(token_times)
        # Without a usage chunk (a server that ignores stream_options), what was sent and what was streamed.
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_len)
        record.completion_tokens = usage.get("completion_tokens", record.chunks)


async def _run_agentic(client: _Client, workload: AgenticWorkload) -> None:
    async def session(index: int) -> None:
        prompt = workload.first_prompt(index)
        for turn in range(workload.turns):
            record = await client.complete(prompt, workload.output_tokens, index, turn)
            if turn + 1 < workload.turns:
                # As long as the server's reply was, so the prompt keeps the shape a real transcript would have.
                generated = record.completion_tokens if record.completion_tokens is not None else workload.output_tokens
                prompt = workload.next_prompt(prompt, index, turn, generated)

    await _all(session(index) for index in range(workload.sessions))


async def _run_random(client: _Client, workload: RandomWorkload) -> None:
    async def one(index: int) -> None:
        prompt, max_tokens = workload.request(index)
        await client.complete(prompt, max_tokens, None, None)

    await _all(one(index) for index in range(workload.num_requests))


async def _all(coroutines: Iterable[Awaitable[None]]) -> None:
    """Run them concurrently; when one fails, cancel the rest (gather alone would leave them running) and re-raise."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


async def scrape_metrics(http: httpx.AsyncClient, url: str) -> list[MetricSample] | None:
    """The server's Prometheus samples, or None when it has no /metrics (or not in the text format)."""
    try:
        response = await http.get(url, timeout=30.0)
        if response.status_code != 200:
            return None
        return [MetricSample(sample.name, dict(sample.labels), sample.value)
                for family in text_string_to_metric_families(response.text) for sample in family.samples]
    except (httpx.HTTPError, ValueError):
        return None


def _total(samples: list[MetricSample], name: str) -> float | None:
    """A counter summed over its label sets (one per served model name), or None when the server has none."""
    values = [sample.value for sample in samples if sample.name == name]
    return sum(values) if values else None


def _ratio_of_deltas(before: list[MetricSample] | None, after: list[MetricSample] | None, numerator: str,
                     denominator: str) -> tuple[bool, float | None]:
    """How much `numerator` grew over how much `denominator` grew between two scrapes: (exported, ratio); the
    ratio is None where the server exports neither or the denominator did not grow."""
    if before is None or after is None:
        return False, None
    top, bottom = _total(after, numerator), _total(after, denominator)
    if top is None or bottom is None:
        return False, None
    bottom -= _total(before, denominator) or 0.0
    top -= _total(before, numerator) or 0.0
    return True, top / bottom if bottom > 0 else None


def prefix_cache_hit_rate(before: list[MetricSample] | None, after: list[MetricSample] | None) -> float | None:
    """Prompt tokens found in the prefix cache over prompt tokens looked up, between two scrapes."""
    for hits_name, queries_name in PREFIX_CACHE_COUNTERS:
        exported, rate = _ratio_of_deltas(before, after, hits_name, queries_name)
        if exported:
            return rate
    return None


# Where the server's TTFT goes, as histograms a vLLM server also exports: a mean from _sum/_count deltas
SERVER_TIME_HISTOGRAMS = {"queue_time_mean_s": "vllm:request_queue_time_seconds",
                          "prefill_time_mean_s": "vllm:request_prefill_time_seconds"}


def server_time_means(before: list[MetricSample] | None, after: list[MetricSample] | None) -> dict[str, float | None]:
    """Mean queue and prefill time of the requests that finished between two scrapes (None: not exported)."""
    return {key: _ratio_of_deltas(before, after, f"{name}_sum", f"{name}_count")[1]
            for key, name in SERVER_TIME_HISTOGRAMS.items()}


def precisions_from_metrics(samples: list[MetricSample] | None) -> dict[str, str] | None:
    for sample in samples or []:
        if sample.name == ENGINE_INFO_METRIC:
            return {key: value for key, value in sample.labels.items() if key != "model_name"}
    return None


def summarize(records: list[RequestRecord], total_time_s: float) -> dict[str, Any]:
    """The run's latency and throughput figures, over the requests that succeeded."""
    done = [record for record in records if record.ok]
    ttfts = [record.ttft_s for record in done]
    itls = [gap for record in done for gap in record.itl_s]  # pooled over requests, as vLLM's benchmark does
    tpots = [record.tpot_s for record in done if record.tpot_s is not None]
    prompt_tokens = sum(record.prompt_tokens for record in done)
    completion_tokens = sum(record.completion_tokens for record in done)
    chunks = sum(record.chunks for record in done)
    summary: dict[str, Any] = {
        "requests": len(done),
        "failed_requests": len(records) - len(done),
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p99_s": _percentile(ttfts, 99),
        "itl_p50_s": _percentile(itls, 50),
        "itl_p99_s": _percentile(itls, 99),
        "tpot_p50_s": _percentile(tpots, 50),
        "tpot_p99_s": _percentile(tpots, 99),
        "e2e_p50_s": _percentile([record.e2e_s for record in done], 50),
        "total_time_s": total_time_s,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "input_output_ratio": prompt_tokens / completion_tokens if completion_tokens else None,
        "output_tokens_per_s": completion_tokens / total_time_s if total_time_s > 0 else None,
        "total_tokens_per_s": (prompt_tokens + completion_tokens) / total_time_s if total_time_s > 0 else None,
        # 1.0 when the server streamed a chunk per token; above it, some gaps span several tokens and ITL (per
        # chunk, as vLLM's benchmark counts it) runs above TPOT.
        "tokens_per_chunk": completion_tokens / chunks if chunks else None,
    }
    turns = sorted({record.turn for record in done if record.session is not None})
    if turns:  # the first turn of each session misses all but the system prompt in the cache, later ones hit
        summary["ttft_p50_s_by_turn"] = [
            _percentile([record.ttft_s for record in done if record.turn == turn], 50) for turn in turns]
    summary["errors"] = sorted({record.error for record in records if record.error})[:5]
    return summary


async def serve_benchmark(base_url: str, model: str, workload: Workload, api_key: str | None = None,
                          max_concurrency: int | None = None, timeout_s: float = 600.0,
                          show_progress: bool = False) -> dict[str, Any]:
    """`run_serve_benchmark` for callers already inside an event loop."""
    base_url = normalize_base_url(base_url)
    metrics_url = base_url.removesuffix("/v1") + "/metrics"  # /metrics and /version live beside /v1
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No cap on connections: a request queued inside the client would have its TTFT inflated by the wait.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(timeout_s, connect=30.0, pool=None)
    async with ChatClient(base_url, api_key=api_key, max_connections=4) as info_client:
        server = await info_client.server_info(model)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as http:
        before = await scrape_metrics(http, metrics_url)
        total = workload.num_requests
        progress = _progress_bar(total) if show_progress else None
        try:
            with _frozen_heap():
                client = _Client(http, model, max_concurrency, progress)
                if isinstance(workload, AgenticWorkload):
                    await _run_agentic(client, workload)
                else:
                    await _run_random(client, workload)
        finally:
            if progress is not None:
                progress.close()
        total_time_s = max((record.end_s for record in client.records), default=0.0)
        after = await scrape_metrics(http, metrics_url)
    summary = summarize(client.records, total_time_s)
    summary["prefix_cache_hit_rate"] = prefix_cache_hit_rate(before, after)
    summary.update(server_time_means(before, after))
    summary["server_precisions"] = server["mixquant"] or precisions_from_metrics(after)
    summary["server_version"] = server["version"]
    summary["base_url"] = base_url
    summary["model"] = model
    summary["max_concurrency"] = max_concurrency
    summary["workload"] = workload.describe()
    summary["per_request"] = [record.row() for record in client.records]
    return summary


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep what exists before the run out of the garbage collector's full passes while it lasts.

    With torch imported (as `mixquant` does) a full pass walks some 10^5 objects and stalls the event loop for tens of
    milliseconds, which would be recorded as the server's inter-token latency outliers.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr)


def run_serve_benchmark(base_url: str, model: str, workload: Workload, api_key: str | None = None,
                        max_concurrency: int | None = None, timeout_s: float = 600.0,
                        show_progress: bool = False) -> dict[str, Any]:
    """Run `workload` against the server at `base_url` (with or without /v1) and return the summary.

    The summary holds the latency percentiles, token counts and rates, the prefix-cache hit rate over the run (None
    when the server exports no prefix-cache counters), the server's precisions (None when it does not say), the
    workload's configuration and, under `per_request`, one row per request. Failed requests are counted in
    `failed_requests` and left out of every figure; a 401/403/404 stops the run with an EndpointError.
    """
    return asyncio.run(serve_benchmark(base_url, model, workload, api_key, max_concurrency, timeout_s,
                                       show_progress))


# ---- command line --------------------------------------------------------------------------------------------------

def _length_range(text: str) -> tuple[int, int]:
    """`1024,2048` -> (1024, 2048); a single number fixes the length."""
    try:
        parts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH or N, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH or N, got {text!r}")
    return parts[0], parts[-1]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mixquant bench serve`."""
    agentic, random_ = AgenticWorkload(), RandomWorkload()
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (/v1 optional)")
    parser.add_argument("--model", required=True, help="the model name the server serves")
    parser.add_argument("--mode", choices=["agentic", "random"], default="agentic")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"prompt ids are drawn from [{LOWEST_TOKEN_ID}, VOCAB_SIZE - {TOP_MARGIN}); keep it "
                             "below the model's first special token (151643 for Qwen3, 128000 for Llama 3)")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight (default: no limit beyond "
                                                            "one per session; random mode sends all at once)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each response chunk")
    parser.add_argument("--output", type=Path, help="write the summary and per-request rows here as JSON")
    group = parser.add_argument_group("agentic mode")
    group.add_argument("--sessions", type=int, default=agentic.sessions)
    group.add_argument("--turns", type=int, default=agentic.turns)
    group.add_argument("--system-tokens", type=int, default=agentic.system_tokens,
                       help="system prompt shared by every session")
    group.add_argument("--first-context", type=int, default=agentic.first_context_tokens,
                       help="each session's own context after the system prompt")
    group.add_argument("--tool-tokens", type=_length_range, default=agentic.tool_tokens, metavar="LOW,HIGH",
                       help="tool output added each turn (uniform)")
    group.add_argument("--output-tokens", type=int, default=agentic.output_tokens, help="generated per turn")
    group = parser.add_argument_group("random mode")
    group.add_argument("--num-requests", type=int, default=random_.num_requests)
    group.add_argument("--input-len", type=_length_range, default=random_.input_len_range, metavar="LOW,HIGH")
    group.add_argument("--output-len", type=_length_range, default=random_.output_len_range, metavar="LOW,HIGH")


def workload_from_args(args: argparse.Namespace) -> Workload:
    if args.mode == "agentic":
        return AgenticWorkload(sessions=args.sessions, turns=args.turns, system_tokens=args.system_tokens,
                               first_context_tokens=args.first_context, tool_tokens=args.tool_tokens,
                               output_tokens=args.output_tokens, seed=args.seed, vocab_size=args.vocab_size)
    return RandomWorkload(num_requests=args.num_requests, input_len_range=args.input_len,
                          output_len_range=args.output_len, seed=args.seed, vocab_size=args.vocab_size)


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The run as one row in the shape of the other `mixquant bench` rows (`kind`, precisions, `tokens_per_s`)."""
    precisions = summary["server_precisions"] or {}
    keys = ["ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "total_time_s", "requests",
            "failed_requests", "prompt_tokens", "completion_tokens", "input_output_ratio", "output_tokens_per_s",
            "total_tokens_per_s", "prefix_cache_hit_rate", *SERVER_TIME_HISTOGRAMS]
    return {
        "kind": "serve",
        "mode": summary["workload"]["mode"],
        "model": summary["model"],
        "prefill_precision": precisions.get("prefill_precision"),
        "decode_precision": precisions.get("decode_precision"),
        **{key: summary[key] for key in keys},
        "tokens_per_s": summary["output_tokens_per_s"],  # generated tokens/s, as vLLM's headline throughput
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(value: float | None) -> str:
        return f"{value * 1e3:.1f} ms" if value is not None else "-"

    def number(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    precisions = summary["server_precisions"] or {}
    pair = (f"{precisions.get('prefill_precision')}/{precisions.get('decode_precision')}" if precisions
            else "unknown")
    table = Table(title=f"bench serve ({summary['workload']['mode']}) {summary['model']} prefill/decode {pair}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    hit_rate = summary["prefix_cache_hit_rate"]
    for name, value in [
        ("requests (failed)", f"{summary['requests']} ({summary['failed_requests']})"),
        ("TTFT p50 / p99", f"{ms(summary['ttft_p50_s'])} / {ms(summary['ttft_p99_s'])}"),
        ("ITL p50 / p99", f"{ms(summary['itl_p50_s'])} / {ms(summary['itl_p99_s'])}"),
        ("TPOT p50 / p99", f"{ms(summary['tpot_p50_s'])} / {ms(summary['tpot_p99_s'])}"),
        ("E2E p50", ms(summary["e2e_p50_s"])),
        ("prompt / completion tokens", f"{summary['prompt_tokens']:,} / {summary['completion_tokens']:,}"),
        ("input:output", number(summary["input_output_ratio"], ".1f") + ":1"),
        ("output tokens/s", number(summary["output_tokens_per_s"], ",.1f")),
        ("total tokens/s", number(summary["total_tokens_per_s"], ",.1f")),
        ("prefix cache hit rate", f"{hit_rate:.1%}" if hit_rate is not None else "n/a (no metrics)"),
        ("server queue / prefill (mean)", f"{ms(summary['queue_time_mean_s'])} / {ms(summary['prefill_time_mean_s'])}"),
        ("total time", f"{summary['total_time_s']:.1f} s"),
    ]:
        table.add_row(name, value)
    Console().print(table)
    for error in summary["errors"]:
        print(f"error: {error}", file=sys.stderr)


def run_serve_command(args: argparse.Namespace) -> int:
    """`mixquant bench serve`: 0 when every request succeeded, 1 otherwise (the output is written either way)."""
    try:
        workload = workload_from_args(args)
    except ValueError as error:
        print(f"mixquant bench serve: {error}", file=sys.stderr)
        return 2
    try:
        summary = run_serve_benchmark(args.base_url, args.model, workload, api_key=args.api_key,
                                      max_concurrency=args.max_concurrency, timeout_s=args.timeout,
                                      show_progress=sys.stderr.isatty())
    except EndpointError as error:
        print(f"mixquant bench serve: {error}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.output is not None:
        requests = summary.pop("per_request")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"summary": summary, "rows": [summary_row(summary)],
                                           "requests": requests}, indent=2))
    return 0 if summary["failed_requests"] == 0 else 1

