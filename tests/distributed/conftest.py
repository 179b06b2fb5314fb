"""Disaggregated prefill and decode on the CPU: NIXL over UCX's TCP transport on loopback, tiny random models."""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mixquant.config import EngineConfig
from mixquant.distributed.kv_transfer import KVTransferConfig
from mixquant.engine.llm_engine import LLMEngine
from mixquant.outputs import RequestOutput
from mixquant.quantization.quantize import quantize_checkpoint
from mixquant.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="session", autouse=True)
def ucx_over_tcp():
    """UCX reads its transports when an agent starts: every agent these tests make talks TCP on loopback."""
    previous = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = "tcp"
    yield
    if previous is None:
        del os.environ["UCX_TLS"]
    else:
        os.environ["UCX_TLS"] = previous


@pytest.fixture(scope="session")
def tiny_fp8(tiny_qwen3, tmp_path_factory) -> Path:
    """tiny_qwen3 as a compressed-tensors FP8 checkpoint: a prefill instance's only weights."""
    return quantize_checkpoint(str(tiny_qwen3), tmp_path_factory.mktemp("tiny-fp8"), "fp8", device="cpu")


def make_engine(model: Path, role: str | None = None, prefill: str = "fp8", decode: str = "bf16",
           extra: dict | None = None, **overrides) -> LLMEngine:
    """A CPU engine; with a role, a disaggregated instance whose side channel takes any free port."""
    kv = KVTransferConfig("NixlConnector", kv_role=role, kv_port=0, kv_connector_extra_config=extra or {}) \
        if role else None
    settings = dict(model=str(model), dtype="float32", device="cpu", prefill_precision=prefill,
                    decode_precision=decode, kv_transfer_config=kv, num_kv_blocks=64, max_model_len=256)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


def run(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams,
        timeout: float = 60) -> RequestOutput:
    """Steps until this request finishes (an instance holding blocks for others always has work)."""
    engine.add_request(request_id, prompt, params)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for output in engine.step():
            if output.request_id == request_id and output.finished:
                return output
    raise TimeoutError(f"request {request_id} did not finish in {timeout} s")


def step_until(engine: LLMEngine, condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        engine.step()


def prefill(engine: LLMEngine, request_id: str, prompt: list[int]) -> dict:
    """What `mixquant proxy` asks of a prefill instance; returns its kv_transfer_params."""
    params = SamplingParams(temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    return run(engine, request_id, prompt, params).kv_transfer_params


def with_kv(params: SamplingParams, kv_transfer_params: dict) -> SamplingParams:
    return replace(params, kv_transfer_params=kv_transfer_params)
