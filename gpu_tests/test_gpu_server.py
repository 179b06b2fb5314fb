"""The server on a GPU, where the engine thread drives CUDA: low-precision prefill kernels, BF16 decode, CUDA graphs.

Run through the device tool: PYTHONPATH=. python3 -m pytest gpu_tests/test_gpu_server.py (CI has no GPU).
"""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from mixquant import LLM, SamplingParams
from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine
from tests.conftest import save_tiny_model
from tests.server.conftest import MODEL_NAME, running_server, server_config
from tests.server.test_load import wait_until_idle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [f"Request number {i} asks about " + "the weather " * i for i in range(8)]
ENGINE = dict(dtype="bfloat16", device="cuda", kv_cache_memory_bytes=256 << 20)  # two engines share the GPU


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpu-qwen3"), "qwen3", hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def test_server_on_gpu_answers_as_the_offline_engine(gpu_model):
    offline = LLM(str(gpu_model), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].text for prompt in PROMPTS]
    del offline
    engine = LLMEngine(EngineConfig(model=str(gpu_model), **ENGINE))
    with running_server(engine, server_config(gpu_model, api_key=None)) as server, server.http() as http:
        for prompt, text in zip(PROMPTS, expected):
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == text

        async def stream(client: httpx.AsyncClient, i: int, leave_early: bool) -> int:
            body = {"model": MODEL_NAME, "prompt": PROMPTS[i % 8], "max_tokens": 400 if leave_early else 5 + i,
                    "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0}
            tokens = 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        tokens += len(httpx.Response(200, content=line[6:]).json()["choices"][0]["logprobs"]["tokens"])
                    if leave_early and tokens >= 3:
                        return tokens
            return tokens

        async def many():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                return await asyncio.gather(*(stream(client, i, leave_early=i >= 32) for i in range(40)))

        counts = asyncio.run(many())
        assert counts[:32] == [5 + i for i in range(32)]
        stats = wait_until_idle(server)
        assert stats["num_blocks_used"] == 0
        precisions = engine.config.describe_precisions()
        assert stats["tokens_computed"][f"prefill/{precisions['prefill_precision']}"] > 0
        print("precisions:", precisions, "tokens computed:", stats["tokens_computed"])
