"""/metrics: Prometheus text that prometheus_client parses, with vLLM's names, and counters that move."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME
from tests.server.test_load import wait_until_idle

VLLM_METRICS = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_count",
                "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count"]


def scrape(http) -> dict[tuple[str, frozenset], float]:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    wanted = frozenset({"model_name": MODEL_NAME, **labels}.items())
    return samples.get((name, wanted), 0.0)


def test_metrics_parse_and_carry_vllm_names(http, server):
    wait_until_idle(server)
    samples = scrape(http)
    names = {name for name, _ in samples}
    assert set(VLLM_METRICS) <= names
    precisions = server.engine.config.describe_precisions()
    assert value(samples, "mixquant:engine_info", prefill_precision=precisions["prefill_precision"],
                 decode_precision=precisions["decode_precision"], prefill_kernels=precisions["prefill_kernels"],
                 decode_kernels=precisions["decode_kernels"], nvfp4="unused") == 1


def test_counters_move_as_requests_complete(http, server):
    wait_until_idle(server)
    before = scrape(http)
    prompt = "Count my tokens please"
    prompt_tokens = len(server.engine.tokenizer(prompt)["input_ids"])
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True})
    assert response.status_code == 200
    after = scrape(http)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("vllm:prompt_tokens_total") == prompt_tokens
    assert moved("vllm:generation_tokens_total") == 5
    assert moved("vllm:request_success_total", finished_reason="length") == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    # the TTFT split at the engine: queue + prefill, each non-negative, their sum within the server's TTFT
    assert moved("vllm:request_queue_time_seconds_count") == moved("vllm:request_prefill_time_seconds_count") == 1
    queue, prefill = moved("vllm:request_queue_time_seconds_sum"), moved("vllm:request_prefill_time_seconds_sum")
    assert queue >= 0 and prefill > 0
    assert queue + prefill <= moved("vllm:time_to_first_token_seconds_sum") + 1e-3
    assert 1 <= moved("vllm:inter_token_latency_seconds_count") <= 4
    assert moved("vllm:request_generation_tokens_sum") == 5
    assert moved("vllm:prefix_cache_queries_total") == prompt_tokens
    precision = server.engine.config.decode_precision
    assert moved("mixquant:tokens_computed_total", phase="decode", precision=precision) == 5
    assert value(after, "vllm:num_requests_running") == 0
