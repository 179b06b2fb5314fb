"""Prometheus metrics under vLLM's names (so vLLM dashboards and tooling work), plus our per-precision counters.

Each app gets its own CollectorRegistry, so several servers can live in one process (the tests make several).
Latencies are observed as outputs arrive from the engine thread; engine-wide counts and gauges are read from the
engine's latest stats snapshot at scrape time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mixquant.outputs import RequestOutput

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histograms line up with a vLLM server's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    buckets = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass
class RequestTimeline:
    """When one engine request arrived and produced its latest tokens."""
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Time between successive outputs of a request.", ITL_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds",
                                     "Time from arrival to the last token of a finished request.", E2E_BUCKETS)
        # TTFT split at the engine: waiting to be scheduled, then from the first scheduled step to the first token
        # (chunked prefill, and steps spent on other requests' chunks between them)
        self.request_queue_time = histogram("vllm:request_queue_time_seconds",
                                            "Time from arrival to the first step that computes the request.",
                                            E2E_BUCKETS)
        self.request_prefill_time = histogram("vllm:request_prefill_time_seconds",
                                              "Time from the request's first scheduled step to its first token.",
                                              E2E_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                               token_buckets(max_model_len))
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per finished request.",
                                                   token_buckets(max_model_len))
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       [*labels, "finished_reason"], registry=self.registry)

    def observe(self, timeline: RequestTimeline, output: RequestOutput, now: float):
        generated = sum(len(completion.token_ids) for completion in output.outputs)
        if generated > timeline.num_generated:
            if timeline.first_token is None:
                timeline.first_token = now
                self.time_to_first_token.observe(now - timeline.arrival)
            else:
                self.inter_token_latency.observe(now - timeline.last_token)
            timeline.last_token = now
            timeline.num_generated = generated
        if output.finished:
            self.e2e_latency.observe(now - timeline.arrival)
            times = output.metrics or {}
            if "first_scheduled_time" in times and "first_token_time" in times:  # engine clock, as vLLM
                self.request_queue_time.observe(times["first_scheduled_time"] - times["arrival_time"])
                self.request_prefill_time.observe(times["first_token_time"] - times["first_scheduled_time"])
            self.request_prompt_tokens.observe(len(output.prompt_token_ids))
            self.request_generation_tokens.observe(generated)
            reason = output.outputs[0].finish_reason or "stop"
            self.request_success.labels(self.model_name, reason).inc()

    def watch_engine(self, stats: Callable[[], dict], precisions: dict[str, str | None]):
        self.registry.register(EngineStatsCollector(self.model_name, stats, precisions))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineStatsCollector(Collector):
    """Engine-wide gauges and counters, read from the engine's latest stats snapshot when scraped."""

    def __init__(self, model_name: str, stats: Callable[[], dict], precisions: dict[str, str | None]):
        self.model_name = model_name
        self.stats = stats
        self.precisions = precisions

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        model = [self.model_name]
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", stats["num_requests_running"]),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats["num_requests_waiting"]),
            ("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", stats["kv_cache_usage"]),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(model, value)
            yield gauge
        for name, doc, value in (
            ("vllm:prompt_tokens", "Prompt tokens processed.", stats["prompt_tokens"]),
            ("vllm:generation_tokens", "Tokens generated.", stats["generation_tokens"]),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             stats["prefix_cache_queries"]),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats["prefix_cache_hits"]),
            ("vllm:num_preemptions", "Sequences preempted to free KV cache.", stats["num_preemptions"]),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(model, value)
            yield counter
        # New names rather than new labels on vLLM's metrics, so vLLM dashboards keep working unchanged.
        computed = CounterMetricFamily("mixquant:tokens_computed",
                                       "Token rows run through the model, by phase and the precision of that phase.",
                                       labels=["model_name", "phase", "precision"])
        for key, count in stats["tokens_computed"].items():
            phase, precision = key.split("/")
            computed.add_metric([self.model_name, phase, precision], count)
        yield computed
        info = GaugeMetricFamily("mixquant:engine_info", "Precision of each phase and how NVFP4 runs (always 1).",
                                 labels=["model_name", *self.precisions])
        info.add_metric([self.model_name, *(value or "unused" for value in self.precisions.values())], 1)
        yield info
        if "kv_transfer" in stats:
            yield from self._kv_transfer(stats["kv_transfer"])

    def _kv_transfer(self, stats: dict) -> Iterator[Metric]:
        """A disaggregated instance's KV transfers, under the names of vLLM's NixlConnector where it has one."""
        model = [self.model_name]
        for name, doc, snapshot in (
            ("vllm:nixl_xfer_time_seconds", "Time to read a request's KV blocks from a prefill instance, "
                                            "handshake included.", stats["read_seconds"]),
            ("vllm:nixl_bytes_transferred", "Bytes of KV read per request.", stats["read_bytes"]),
        ):
            histogram = HistogramMetricFamily(name, doc, labels=["model_name"])
            buckets = [(str(bound), count) for bound, count in zip(snapshot["buckets"], snapshot["counts"])]
            histogram.add_metric(model, buckets + [("+Inf", snapshot["count"])], snapshot["sum"])
            yield histogram
        for name, doc, value in (
            ("mixquant:kv_transfer_blocks", "KV blocks read from prefill instances.", stats["blocks_read"]),
            ("vllm:nixl_num_failed_transfers", "KV reads that failed or timed out.", stats["failed_reads"]),
            ("vllm:nixl_num_kv_expired_reqs", "Requests whose KV no decode instance read within "
                                              "abort_request_timeout (prefill side).", stats["expired_requests"]),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(model, value)
            yield counter
        fallbacks = CounterMetricFamily(
            "mixquant:kv_transfer_fallbacks", "Requests that computed their prompt here instead of reading its KV, "
                                              "by reason.", labels=["model_name", "reason"])
        for reason, count in stats["fallbacks"].items():
            fallbacks.add_metric([self.model_name, reason], count)
        yield fallbacks
        held = GaugeMetricFamily("mixquant:kv_transfer_held_requests",
                                 "Requests whose KV blocks wait for a decode instance to read them.",
                                 labels=["model_name"])
        held.add_metric(model, stats["held_requests"])
        yield held
