"""Bad requests get the right status and an OpenAI-shaped error naming the problem; the server keeps serving."""
from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME

USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@dataclass
class Case:
    path: str
    body: dict | bytes
    status: int
    says: str  # a piece of the error message that names the problem
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {API_KEY}"})


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", **fields}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": USER, **fields}


CASES = {
    "prompt of the wrong type": Case("/v1/completions", completion(prompt=42), 400, "prompt"),
    "prompt missing": Case("/v1/completions", {"model": MODEL_NAME}, 400, "prompt: Field required"),
    "empty prompt": Case("/v1/completions", completion(prompt=""), 400, "empty"),
    "empty prompt list": Case("/v1/completions", completion(prompt=[]), 400, "empty"),
    "token ids outside the vocabulary": Case("/v1/completions", completion(prompt=[1, 2, 10**9]), 400, "token ids"),
    "max_tokens not a number": Case("/v1/completions", completion(max_tokens="lots"), 400, "max_tokens"),
    "negative max_tokens": Case("/v1/completions", completion(max_tokens=-3), 400, "max_tokens must be at least 1"),
    "max_tokens past the context": Case("/v1/completions", completion(max_tokens=100_000), 400,
                                        "maximum context length is 1024 tokens"),
    "huge max_completion_tokens": Case("/v1/chat/completions", chat(max_completion_tokens=10**12), 400,
                                       "max_completion_tokens"),
    "negative temperature": Case("/v1/completions", completion(temperature=-0.5), 400, "temperature must be >= 0"),
    "NaN temperature": Case("/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature"),
    "top_p of zero": Case("/v1/completions", completion(top_p=0), 400, "top_p must be in (0, 1]"),
    "top_p above one": Case("/v1/chat/completions", chat(top_p=1.5), 400, "top_p must be in (0, 1]"),
    "negative top_k": Case("/v1/completions", completion(top_k=-5), 400, "top_k"),
    "presence_penalty out of range": Case("/v1/completions", completion(presence_penalty=5), 400, "presence_penalty"),
    "n of zero": Case("/v1/completions", completion(n=0), 400, "n: Input should be greater than or equal to 1"),
    "min_tokens above max_tokens": Case("/v1/completions", completion(min_tokens=20, max_tokens=5), 400,
                                        "min_tokens"),
    "stop of the wrong type": Case("/v1/completions", completion(stop=[1, 2]), 400, "stop"),
    "too many logprobs": Case("/v1/completions", completion(logprobs=100), 400, "logprobs must be between 0 and 20"),
    "top_logprobs without logprobs": Case("/v1/chat/completions", chat(top_logprobs=2), 400, "logprobs"),
    "suffix": Case("/v1/completions", completion(suffix="!"), 400, "suffix is not supported"),
    "logit_bias": Case("/v1/completions", completion(logit_bias={"11": 5}), 400, "logit_bias"),
    "empty messages": Case("/v1/chat/completions", chat(messages=[]), 400, "messages: List should have at least 1"),
    "unknown role": Case("/v1/chat/completions", chat(messages=[{"role": "robot", "content": "Hi"}]), 400,
                         "'robot'"),
    "content not text": Case("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "only text content parts"),
    "tool call without an id": Case("/v1/chat/completions", chat(messages=[*USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), 400, "tool_calls.0.id: Field required"),
    "tool result without tool_call_id": Case("/v1/chat/completions", chat(messages=[
        *USER, {"role": "tool", "content": "21 degrees"}]), 400, "tool_call_id: Field required"),
    "tool call arguments that are not JSON": Case("/v1/chat/completions", chat(messages=[*USER, {
        "role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{city: Paris"}}]}]), 400,
        "arguments is not valid JSON"),
    "tool_choice naming an unknown function": Case("/v1/chat/completions", chat(
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "'nope'"),
    "tool_choice without tools": Case("/v1/chat/completions", chat(tool_choice="required"), 400, "no tools"),
    "response_format json_schema without a schema": Case("/v1/chat/completions", chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "json_schema.schema"),
    "invalid JSON": Case("/v1/completions", b'{"prompt": "Hi",', 400, "not valid JSON"),
    "non-UTF-8 bytes": Case("/v1/completions", b'{"prompt": "caf\xe9 \xff"}', 400, "not valid UTF-8"),
    "body over the size limit": Case("/v1/completions", completion(prompt="x" * (2 << 20)), 413, "at most 1048576"),
    "unknown model": Case("/v1/completions", completion(model="gpt-5"), 404, "`gpt-5` does not exist"),
    "wrong API key": Case("/v1/completions", completion(), 401, "invalid API key",
                          headers={"Authorization": "Bearer wrong"}),
    "missing API key": Case("/v1/chat/completions", chat(), 401, "missing API key", headers={}),
    "unknown route": Case("/v1/embeddings", {"input": "Hi"}, 404, "Not Found"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_request_is_refused_with_a_message(server, name):
    case = CASES[name]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        if isinstance(case.body, bytes):
            response = http.post(case.path, content=case.body,
                                 headers={**case.headers, "Content-Type": "application/json"})
        else:
            response = http.post(case.path, json=case.body, headers=case.headers)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert case.says in error["message"]
    assert error["code"] == case.status and error["type"]


def test_oversized_chunked_body_is_refused(http):
    def chunks():
        for _ in range(64):
            yield b"x" * (32 << 10)

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "at most" in response.json()["error"]["message"]


def test_key_is_not_needed_outside_v1(server):
    with server.http() as http:
        http.headers.pop("Authorization")
        assert http.get("/health").status_code == 200
        assert http.post("/tokenize", json={"prompt": "Hi"}).status_code == 200


def test_still_serves_after_bad_inputs(client):
    response = client.completions.create(model=MODEL_NAME, prompt="Still here?", max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3
