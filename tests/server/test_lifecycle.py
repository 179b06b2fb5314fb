"""Start, overload, engine failure and shutdown: `mixquant serve` as a process, and servers of their own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mixquant.server.config import ServerConfig, load_generation_defaults
from mixquant.server.protocol import CompletionRequest
from mixquant.server.serving import ServingContext
from tests.server.conftest import free_port, running_server, server_config, tiny_engine


def test_a_dead_engine_answers_503(tiny_qwen3):
    engine = tiny_engine(tiny_qwen3)
    with running_server(engine, server_config(tiny_qwen3, api_key=None)) as server, server.http() as http:
        assert http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2}).status_code == 200

        def broken_step():
            raise RuntimeError("simulated device failure")

        engine.step = broken_step
        failed = http.post("/v1/completions", json={"prompt": "boom", "max_tokens": 2})
        assert failed.status_code == 503 and "simulated device failure" in failed.json()["error"]["message"]
        assert http.get("/health").status_code == 503
        again = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert again.status_code == 503 and "not running" in again.json()["error"]["message"]


def test_requests_beyond_the_bound_answer_503(tiny_qwen3):
    config = server_config(tiny_qwen3, api_key=None, max_pending_requests=2)
    with running_server(tiny_engine(tiny_qwen3), config) as server, server.http() as http:
        long = {"prompt": "Keep going", "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as first, \
                http.stream("POST", "/v1/completions", json=long) as second:
            assert first.status_code == second.status_code == 200
            refused = http.post("/v1/completions", json={"prompt": "one more", "max_tokens": 1})
            assert refused.status_code == 503 and "overloaded" in refused.json()["error"]["message"]
        deadline = time.monotonic() + 10  # the two streams were dropped, so their slots come back
        while server.async_engine.num_pending_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.post("/v1/completions", json={"prompt": "now", "max_tokens": 1}).status_code == 200


def test_serve_process_drains_on_sigterm_and_exits_0(tiny_qwen3):
    port = free_port()
    command = [sys.executable, "-m", "mixquant.cli", "serve", str(tiny_qwen3), "--port", str(port), "--dtype",
               "float32", "--device", "cpu", "--served-model-name", "tiny", "--uvicorn-log-level", "warning",
               "--reasoning-parser", "qwen3"]
    env = {**os.environ, "MIXQUANT_API_KEY": "from-env"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        startup = process.stdout.readline()
        for words in ("tiny", "prefill bf16", "decode bf16", "NVFP4 unused", "KV cache", f"http://127.0.0.1:{port}"):
            assert words in startup
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the server did not come up"
            time.sleep(0.1)
        headers = {"Authorization": "Bearer from-env"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"

        finish_reasons = []

        def in_flight():
            body = {"prompt": "Drain me", "max_tokens": 150, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        finish_reasons.append(json.loads(line[6:])["choices"][0].get("finish_reason"))

        reader = threading.Thread(target=in_flight)
        reader.start()
        while not finish_reasons:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections once shutting down
            httpx.get(f"{url}/health")
        reader.join(timeout=60)
        assert finish_reasons[-1] == "length"  # the request in flight was allowed to finish
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()


def test_auto_tool_choice_needs_a_parser(tmp_path):
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ServerConfig(served_model_names=["m"], model_path=str(tmp_path), enable_auto_tool_choice=True)


def test_generation_defaults_apply_unless_the_request_sets_them(tmp_path):
    model_defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert load_generation_defaults("auto", model_defaults) == model_defaults
    assert load_generation_defaults("none", model_defaults) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "eos_token_id": 1}))
    assert load_generation_defaults(str(tmp_path), model_defaults) == {"temperature": 0.3}
    config = ServerConfig(served_model_names=["m"], model_path=str(tmp_path), generation_defaults=model_defaults)
    ctx = ServingContext(engine=None, config=config, tokenizer=None, max_model_len=1024)
    params = ctx.sampling_params(CompletionRequest(prompt="x", temperature=0.0, top_k=5), max_tokens=8, logprobs=None)
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.95, 5)
