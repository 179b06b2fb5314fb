"""A tensor-parallel engine that cannot start, or loses a rank, fails with an error that says why and leaves no
process behind; a server of one answers 503 once a rank is gone, and `mixquant serve -tp 2` stops every rank on
SIGTERM."""
from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from mixquant import LLM, SamplingParams
from mixquant.distributed import parallel_state
from mixquant.distributed.executor import WorkerDiedError
from tests.conftest import save_tiny_model
from tests.server.conftest import free_port, running_server, server_config, tiny_engine

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _assert_no_process_left(pids: list[int]):
    assert not multiprocessing.active_children()
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert not parallel_state.is_tensor_parallel_initialized()  # another engine may start


def _workers(engine) -> list[int]:
    return [process.pid for process in engine.runner.workers]


def _wait_for(condition, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("case", ["heads", "nvfp4-blocks"])
def test_a_shape_that_cannot_be_split_names_the_layer_and_sizes(tiny_qwen3, tmp_path, case):
    children_before = psutil.Process().children(recursive=True)
    if case == "heads":  # fails as the model is built, on every rank
        kwargs = dict(model=str(tiny_qwen3), hf_overrides={"num_attention_heads": 3, "num_key_value_heads": 3})
        message = r"model\.layers\.0\.self_attn: num_attention_heads: 3 do not split into 2 equal parts"
    else:  # fails once loaded, where the layer's NVFP4 method is built: 80 input columns, 40 a rank
        kwargs = dict(model=str(save_tiny_model(tmp_path / "m", "qwen3", intermediate_size=80)),
                      prefill_precision="nvfp4")
        message = (r"model\.layers\.0\.mlp\.down_proj: NVFP4 quantizes blocks of 16 input columns, which a rank holds "
                   r"whole, but this layer has 40 input columns \(80 split over 2 ranks\)")
    with pytest.raises(ValueError, match=message):
        LLM(dtype="float32", device="cpu", tensor_parallel_size=2, **kwargs)
    # multiprocessing's resource tracker, started with the first spawned process, stays until this process exits
    started = [p.pid for p in psutil.Process().children(recursive=True)
               if p not in children_before and "resource_tracker" not in " ".join(p.cmdline())]
    _assert_no_process_left(started)


def test_an_engine_dropped_without_close_stops_its_ranks(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", tensor_parallel_size=2)
    assert llm.generate("fine", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    pids = _workers(llm.engine)
    del llm
    gc.collect()
    _assert_no_process_left(pids)


def test_a_worker_killed_while_idle_fails_the_engine_naming_it(tiny_qwen3):
    llm = LLM(str(tiny_qwen3), dtype="float32", device="cpu", tensor_parallel_size=2)
    assert llm.generate("fine", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    pids = _workers(llm.engine)
    os.kill(pids[0], signal.SIGKILL)
    _wait_for(lambda: llm.engine.failure is not None)  # the watchdog noticed, with no step running
    expected = rf"tensor-parallel rank 1 \(pid {pids[0]}\) was killed by SIGKILL; the engine has stopped"
    assert isinstance(llm.engine.failure, WorkerDiedError)
    with pytest.raises(WorkerDiedError, match=expected):
        llm.generate("then", GREEDY, use_tqdm=False)
    _assert_no_process_left(pids)
    llm.engine.close()  # nothing left to do, and no error


def test_a_server_whose_worker_dies_mid_stream_answers_503(tiny_qwen3):
    engine = tiny_engine(tiny_qwen3, tensor_parallel_size=2)
    pids = _workers(engine)
    with running_server(engine, server_config(tiny_qwen3, api_key=None)) as server, server.http() as http:
        assert http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2}).status_code == 200
        chunks = []

        def stream():
            body = {"prompt": "Keep going", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        _wait_for(lambda: len(chunks) > 2)
        os.kill(pids[0], signal.SIGKILL)
        reader.join(timeout=60)
        assert not reader.is_alive()
        events = [json.loads(c[6:]) for c in chunks if c != "data: [DONE]"]
        assert all(e["choices"][0].get("finish_reason") is None for e in events if "choices" in e)  # cut short
        assert "rank 1" in events[-1]["error"]["message"]  # and told why
        health = http.get("/health")
        assert health.status_code == 503 and f"tensor-parallel rank 1 (pid {pids[0]})" in health.json()["error"][
            "message"]
        again = http.post("/v1/completions", json={"prompt": "more", "max_tokens": 2})
        assert again.status_code == 503 and "rank 1" in again.json()["error"]["message"]
    engine.close()
    _assert_no_process_left(pids)


def test_serve_tensor_parallel_process_stops_every_rank_on_sigterm(tiny_qwen3):
    port = free_port()
    command = [sys.executable, "-m", "mixquant.cli", "serve", str(tiny_qwen3), "--port", str(port), "--dtype",
               "float32", "--device", "cpu", "-tp", "2", "--uvicorn-log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert "tensor parallel 2" in process.stdout.readline()
        _wait_for(lambda: _healthy(url) or process.poll() is not None, 120)
        assert process.poll() is None, "the server did not come up"
        ranks = psutil.Process(process.pid).children(recursive=True)
        assert any("spawn_main" in " ".join(p.cmdline()) for p in ranks), "no worker process"
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("fixture, model_class", [("tiny_qwen3_5", "Qwen3_5ForCausalLM"),
                                                   ("tiny_gemma4", "Gemma4ForCausalLM")])
def test_a_family_whose_layers_do_not_split_is_refused_before_any_rank_starts(request, fixture, model_class):
    with pytest.raises(ValueError, match=f"{model_class}'s layers are not split over ranks yet"):
        LLM(str(request.getfixturevalue(fixture)), device="cpu", dtype="float32", tensor_parallel_size=2)
    assert not multiprocessing.active_children()


def test_a_disaggregated_instance_is_refused_before_any_rank_starts(tiny_qwen3):
    from mixquant.distributed.kv_transfer import KVTransferConfig

    with pytest.raises(ValueError, match="disaggregated instance .* tensor_parallel_size=1"):
        LLM(str(tiny_qwen3), device="cpu", dtype="float32", tensor_parallel_size=2,
            kv_transfer_config=KVTransferConfig("NixlConnector", kv_role="kv_both", kv_port=0))
    assert not multiprocessing.active_children()
