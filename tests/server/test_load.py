"""Many clients at once on the real engine: concurrent streams, and clients that leave in the middle."""
from __future__ import annotations

import asyncio
import time

import httpx

from tests.server.conftest import MODEL_NAME


def wait_until_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.async_engine.stats
        if stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {server.async_engine.stats}")


def test_64_concurrent_streams_of_mixed_lengths(server):
    client = server.async_openai()
    lengths = [1 + (i * 7) % 24 for i in range(64)]

    async def chat(i: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "word " * (i % 13 + 1)}], max_tokens=lengths[i],
            temperature=0, logprobs=True, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        tokens, usage = 0, None
        async for chunk in stream:
            usage = chunk.usage or usage
            tokens += sum(len(choice.logprobs.content) for choice in chunk.choices if choice.logprobs)
        return tokens, usage.completion_tokens

    async def completion(i: int) -> tuple[int, int]:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt="token " * (i * 5 % 97 + 1), max_tokens=lengths[i], temperature=0, logprobs=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        tokens, usage = 0, None
        async for chunk in stream:
            usage = chunk.usage or usage
            tokens += sum(len(choice.logprobs.tokens) for choice in chunk.choices)
        return tokens, usage.completion_tokens

    async def all_of_them():
        return await asyncio.gather(*(chat(i) if i % 2 else completion(i) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert results == [(n, n) for n in lengths]
    wait_until_idle(server)


def test_clients_that_disconnect_free_their_kv_blocks(server):
    before = wait_until_idle(server)
    assert before["num_blocks_used"] == 0

    async def leave_after_three_chunks(http: httpx.AsyncClient, i: int):
        body = {"model": MODEL_NAME, "prompt": f"Client {i} says " * 30, "max_tokens": 900, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data:")
                if chunks == 3:
                    return  # leaving the block closes the connection mid-stream

    async def bystander(http: httpx.AsyncClient) -> int:
        body = {"model": MODEL_NAME, "prompt": "Unaffected", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        return (await http.post("/v1/completions", json=body)).json()["usage"]["completion_tokens"]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as http:
            *_, bystander_tokens = await asyncio.gather(*(leave_after_three_chunks(http, i) for i in range(16)),
                                                        bystander(http))
            return bystander_tokens

    assert asyncio.run(scenario()) == 40
    after = wait_until_idle(server)
    assert after["num_blocks_used"] == before["num_blocks_used"]
    assert after["kv_cache_usage"] == before["kv_cache_usage"]
    # the 16 requests were aborted, not run to their 900 tokens
    assert after["generation_tokens"] - before["generation_tokens"] < 16 * 900 // 4


def test_client_that_gives_up_on_a_non_streamed_request_frees_its_blocks(server):
    before = wait_until_idle(server)
    body = {"model": MODEL_NAME, "prompt": "Patience " * 40, "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    with server.http() as http:
        try:
            http.post("/v1/completions", json=body, timeout=0.5)
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("the request was expected to outlast the client's timeout")
    after = wait_until_idle(server)
    assert after["num_blocks_used"] == before["num_blocks_used"]
    assert after["generation_tokens"] - before["generation_tokens"] < 900
