"""`mixquant serve` as prefill and decode processes behind `mixquant proxy`, against a co-located fp8/bf16 server.

The prefill instance loads only the FP8 checkpoint; the decode instance holds the model's weights. Failures (a
prefill instance down, killed after answering, blocks nobody reads, clients that leave) end with the KV usage of
both instances back at zero.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from mixquant.server.proxy import ProxyConfig, build_proxy_app
from tests.server.conftest import free_port, running_server, server_config, tiny_engine

NAME = "tiny"
GREEDY = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}


@dataclass
class Instance:
    url: str
    process: subprocess.Popen | None = None

    def metric(self, name: str, **labels) -> float:
        """A metric's value, summed over the samples whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def kv_usage(self) -> float:
        return self.metric("vllm:kv_cache_usage_perc")

    def wait_for_kv_usage_zero(self, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while self.kv_usage() != 0 or self.metric("vllm:num_requests_running"):
            assert time.monotonic() < deadline, f"{self.url} still uses KV blocks"
            time.sleep(0.1)


def start(tmp_path: Path, name: str, *args: str) -> Instance:
    """`mixquant ARGS --port P` in a process of its own (the worktree's code: PYTHONPATH and cwd are kept)."""
    port = free_port()
    with open(tmp_path / f"{name}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mixquant.cli", *args, "--port", str(port),
                                    "--uvicorn-log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "UCX_TLS": "tcp"})
    return Instance(f"http://127.0.0.1:{port}", process)


def serve(tmp_path: Path, name: str, model: Path, *args: str, role: str | None = None, **extra) -> Instance:
    kv = ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": role, "kv_port": 0,
                                              "kv_connector_extra_config": extra})] if role else []
    return start(tmp_path, name, "serve", str(model), "--served-model-name", NAME, "--dtype", "float32",
                 "--device", "cpu", *kv, *args)


def wait_healthy(tmp_path: Path, *instances: Instance, timeout: float = 180):
    deadline = time.monotonic() + timeout
    for instance in instances:
        while True:
            try:
                if httpx.get(f"{instance.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or instance.process.poll() is not None:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
                raise RuntimeError(f"{instance.url} did not come up\n{logs}")
            time.sleep(0.2)


def stop(*instances: Instance):
    for instance in instances:
        if instance.process.poll() is None:
            instance.process.terminate()
    for instance in instances:
        try:
            instance.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            instance.process.kill()


@contextmanager
def proxy_in_process(prefill: list[str], decode: list[str]) -> Iterator[Instance]:
    """A proxy in a thread of this process, for the failure tests (the `cluster` runs `mixquant proxy` itself)."""
    server = uvicorn.Server(uvicorn.Config(build_proxy_app(ProxyConfig(prefill, decode)), port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield Instance(f"http://127.0.0.1:{server.config.port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Cluster:
    prefill: Instance
    decode: Instance
    colocated: Instance  # in this process
    proxy: Instance
    doomed: Instance  # a prefill instance the tests kill


@pytest.fixture(scope="module")
def cluster(tiny_qwen3, tiny_fp8, tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("disaggregated")
    # the prefill instance loads only the FP8 checkpoint; MODEL only names the model
    prefill = serve(tmp, "prefill", tiny_qwen3, "--prefill-model", str(tiny_fp8), role="kv_producer")
    # the decode instance would prefill in fp8 too, so that a fallback gives the co-located output as well
    decode = serve(tmp, "decode", tiny_qwen3, "--prefill-precision", "fp8", role="kv_consumer")
    doomed = serve(tmp, "doomed", tiny_qwen3, "--prefill-precision", "fp8", role="kv_producer",
                   abort_request_timeout=1)
    proxy = start(tmp, "proxy", "proxy", "--prefill", prefill.url, "--decode", decode.url)
    processes = (prefill, decode, doomed, proxy)
    colocated = tiny_engine(tiny_qwen3, prefill_precision="fp8", decode_precision="bf16")
    try:
        with running_server(colocated, server_config(tiny_qwen3, served_model_names=[NAME], api_key=None, reasoning_parser=None,
                                                     tool_call_parser=None, enable_auto_tool_choice=False)) as server:
            wait_healthy(tmp, *processes)
            yield Cluster(prefill, decode, Instance(server.url), proxy, doomed)
    finally:
        stop(*processes)


def completion(url: str, prompt: str, **fields) -> dict:
    response = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": prompt, **GREEDY, **fields},
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


PROMPTS = [f"Request {i}: the tool returned " + "rows of numbers, " * (2 * i) + "and then" for i in range(10)]


def test_outputs_through_the_proxy_equal_the_colocated_servers(cluster):
    for prompt in PROMPTS:
        got = completion(cluster.proxy.url, prompt)
        assert got["choices"][0]["text"] == completion(cluster.colocated.url, prompt)["choices"][0]["text"]
        assert got["usage"]["completion_tokens"] == GREEDY["max_tokens"] and got["kv_transfer_params"] is None
    messages = [{"role": "user", "content": "Summarize the tool output: rows of numbers."}]
    chat = {"model": NAME, "messages": messages, **GREEDY}
    got = httpx.post(f"{cluster.proxy.url}/v1/chat/completions", json=chat, timeout=120).json()
    want = httpx.post(f"{cluster.colocated.url}/v1/chat/completions", json=chat, timeout=120).json()
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    # the prompts' KV came from the prefill instance, which computed nothing else
    decode, prefill = cluster.decode, cluster.prefill
    assert decode.metric("mixquant:tokens_computed_total", phase="prefill") == 0
    assert decode.metric("mixquant:kv_transfer_blocks_total") > 0
    assert decode.metric("vllm:nixl_xfer_time_seconds_count") == len(PROMPTS) + 1
    assert prefill.metric("mixquant:tokens_computed_total", phase="decode") == 0
    assert prefill.metric("mixquant:tokens_computed_total", phase="prefill", precision="fp8") > 0
    assert cluster.proxy.metric("mixquant:proxy_prefill_fallbacks_total") == 0
    prefill.wait_for_kv_usage_zero()
    decode.wait_for_kv_usage_zero()


def test_streams_pass_through(cluster):
    client = openai.OpenAI(base_url=f"{cluster.proxy.url}/v1", api_key="unused", max_retries=0)
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model=NAME, prompt=PROMPTS[3], stream=True, extra_body={"ignore_eos": True}, temperature=0, max_tokens=10)]
    assert len(pieces) > 1 and "".join(pieces) == completion(cluster.colocated.url, PROMPTS[3])["choices"][0]["text"]
    messages = [{"role": "user", "content": "Stream this back."}]
    stream = client.chat.completions.create(model=NAME, messages=messages, stream=True, temperature=0, max_tokens=10,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    want = httpx.post(f"{cluster.colocated.url}/v1/chat/completions",
                      json={"model": NAME, "messages": messages, **GREEDY}, timeout=120).json()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        want["choices"][0]["message"]["content"]
    assert chunks[-1].usage.completion_tokens == 10


async def session(client: openai.AsyncOpenAI, index: int, turns: int = 3) -> list[str]:
    """A conversation that grows turn by turn: each request repeats the previous ones (prefix reuse)."""
    messages = [{"role": "system", "content": "You are a terse agent. Tools return tables."}]
    replies = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Session {index}, step {turn}: call the tool on row {turn}."})
        response = await client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=8,
                                                        extra_body={"ignore_eos": True})
        reply = response.choices[0].message.content or ""
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return replies


def sessions(url: str, count: int) -> list[list[str]]:
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(session(client, i) for i in range(count)))

    return asyncio.run(run())


def test_sixteen_concurrent_multi_turn_sessions(cluster):
    hits = cluster.prefill.metric("vllm:prefix_cache_hits_total"), cluster.decode.metric("vllm:prefix_cache_hits_total")
    assert sessions(cluster.proxy.url, 16) == sessions(cluster.colocated.url, 16)
    assert cluster.prefill.metric("vllm:prefix_cache_hits_total") > hits[0]  # later turns reuse earlier ones
    assert cluster.decode.metric("vllm:prefix_cache_hits_total") > hits[1]
    assert cluster.decode.metric("mixquant:tokens_computed_total", phase="prefill") == 0
    cluster.prefill.wait_for_kv_usage_zero()
    cluster.decode.wait_for_kv_usage_zero()


def test_clients_that_leave_abort_on_both_sides(cluster):
    generated = cluster.decode.metric("vllm:generation_tokens_total")
    long = {"model": NAME, "prompt": PROMPTS[9], "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{cluster.proxy.url}/v1/completions", json={**long, "stream": True},
                      timeout=60) as response:
        next(response.iter_lines())  # the decode instance is generating: leave now

    async def leave_while_decoding():  # a client of a non-streamed request gives up
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.create_task(client.post(f"{cluster.proxy.url}/v1/completions", json=long))
            deadline = time.monotonic() + 30
            while not cluster.decode.metric("vllm:num_requests_running"):
                assert time.monotonic() < deadline and not request.done()
                await asyncio.sleep(0.05)
            request.cancel()

    asyncio.run(leave_while_decoding())
    cluster.decode.wait_for_kv_usage_zero()
    cluster.prefill.wait_for_kv_usage_zero()
    assert cluster.decode.metric("vllm:generation_tokens_total") - generated < 2 * 900  # neither ran to its end


def test_a_prefill_instance_that_is_down_leaves_the_prompt_to_the_decode_instance(cluster):
    dead = f"http://127.0.0.1:{free_port()}"
    with proxy_in_process([dead], [cluster.decode.url]) as proxy:
        got = completion(proxy.url, PROMPTS[5])
        assert proxy.metric("mixquant:proxy_prefill_fallbacks_total", reason="unreachable") == 1
        assert httpx.get(f"{proxy.url}/health").status_code == 503
    assert got["choices"][0]["text"] == completion(cluster.colocated.url, PROMPTS[5])["choices"][0]["text"]
    cluster.decode.wait_for_kv_usage_zero()


def test_a_prefill_instance_killed_after_answering(cluster):
    """The decode instance cannot read the blocks, falls back and says so; unread blocks expire on the prefill side
    before that."""
    prefill = cluster.doomed
    with proxy_in_process([prefill.url], [cluster.decode.url]) as proxy:
        completion(proxy.url, PROMPTS[1])  # the decode instance knows this prefill instance now
    prompt = "A prompt no other test sends, so the decode instance's prefix cache has none of it: " * 2
    body = {"model": NAME, "prompt": prompt, **GREEDY, "kv_transfer_params": {"do_remote_decode": True}}
    httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=60).raise_for_status()
    assert prefill.kv_usage() > 0
    prefill.wait_for_kv_usage_zero(timeout=10)  # nobody read them within abort_request_timeout
    assert prefill.metric("vllm:nixl_num_kv_expired_reqs_total") == 1

    params = httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=60).json()["kv_transfer_params"]
    prefill.process.kill()
    prefill.process.wait()
    failed = cluster.decode.metric("mixquant:kv_transfer_fallbacks_total", reason="transfer_failed")
    got = completion(cluster.decode.url, prompt, kv_transfer_params=params)
    assert got["choices"][0]["text"] == completion(cluster.colocated.url, prompt)["choices"][0]["text"]
    assert cluster.decode.metric("mixquant:kv_transfer_fallbacks_total", reason="transfer_failed") == failed + 1
    cluster.decode.wait_for_kv_usage_zero()


def test_bad_kv_transfer_params_are_refused(cluster):
    response = httpx.post(f"{cluster.decode.url}/v1/completions", timeout=30, json={
        "model": NAME, "prompt": "x y z", "kv_transfer_params": {"do_remote_prefill": True, "remote_port": "80"}})
    assert response.status_code == 400 and "kv_transfer_params.remote_engine_id" in response.json()["error"]["message"]
    response = httpx.post(f"{cluster.prefill.url}/v1/completions", timeout=30,
                          json={"model": NAME, "prompt": "x y z", "max_tokens": 2})
    assert response.status_code == 400 and "only prefills" in response.json()["error"]["message"]
    response = httpx.post(f"{cluster.prefill.url}/v1/completions", timeout=30, json={
        "model": NAME, "prompt": "x y z", "stream": True, "kv_transfer_params": {"do_remote_decode": True}})
    assert response.status_code == 400 and "stream false" in response.json()["error"]["message"]
    assert httpx.get(f"{cluster.proxy.url}/v1/models").json()["data"][0]["id"] == NAME
    assert httpx.get(f"{cluster.proxy.url}/health").status_code == 200


def test_without_prefill_instances_the_proxy_takes_decode_instances_in_turn(cluster):
    servers = (cluster.decode, cluster.colocated)
    before = [server.metric("vllm:request_success_total") for server in servers]
    with proxy_in_process([], [server.url for server in servers]) as proxy:
        texts = {completion(proxy.url, PROMPTS[2])["choices"][0]["text"] for _ in range(2)}
    assert [server.metric("vllm:request_success_total") - b for server, b in zip(servers, before)] == [1, 1]
    assert texts == {completion(cluster.colocated.url, PROMPTS[2])["choices"][0]["text"]}


def test_command_line_errors_name_the_problem(capsys):
    from mixquant.cli import main

    assert main(["proxy", "--prefill", "127.0.0.1:8100", "--decode", "http://127.0.0.1:8200"]) == 2
    assert "must be http:// or https:// URLs, got 127.0.0.1:8100" in capsys.readouterr().err
    assert main(["serve", "--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "decode"}']) == 2
    assert "kv_role 'decode' is not one of kv_both, kv_producer, kv_consumer" in capsys.readouterr().err
