"""Structured outputs and tool choice through `mixquant serve`, enforced, on the bundled model: response formats and
vLLM's fields, required and named tool calls, tool calls or content, parse(), streaming, bad schemas, aborts."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from mixquant import tiny
from mixquant.tiny import tasks
from tests.server.test_tool_calls_end_to_end import assemble

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"], "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "Santiago", "Oslo"]}}}
ASK = [{"role": "user", "content": "Who is the employee in Paris? Answer as JSON."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def tool_calls(seed: int) -> tasks.Example:
    """A conversation that ends where the bundled model calls a tool (each seed its own request and tools)."""
    return tasks.generate("tool_use", seed, stage="call")


def openai_messages(messages: list[dict]) -> list[dict]:
    """The task generator's messages as an OpenAI client sends them: calls with ids and arguments as JSON text."""
    sent = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [{"id": f"call-{i}", "type": "function", "function": {
                "name": call["function"]["name"], "arguments": json.dumps(call["function"]["arguments"])}}
                for call in message["tool_calls"]]
        if message["role"] == "tool":
            message["tool_call_id"] = f"call-{i - 1}"
        sent.append(message)
    return sent


def check_calls(message, example: tasks.Example):
    """Every call is of an offered function, with arguments that match its parameters schema."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in example.tools}
    assert message.tool_calls, message
    for call in message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def gather(server, requests: list[dict]) -> list:
    async def run():
        async with server.async_openai() as client:
            return await asyncio.gather(*[client.chat.completions.create(model=tiny.NAME, **r) for r in requests])
    return asyncio.run(run())


def test_json_schema_holds_for_20_seeds(bundled_server):
    replies = gather(bundled_server, [dict(messages=ASK, response_format=person_format(), temperature=0.7, seed=seed,
                                           max_tokens=200, extra_body=NO_THINKING) for seed in range(20)])
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    assert len({reply.choices[0].message.content for reply in replies}) > 1


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_starts_after_the_reasoning(bundled_server, stream):
    client = bundled_server.openai()
    reply = client.chat.completions.create(model=tiny.NAME, messages=ASK, response_format=person_format(strict=False),
                                           temperature=0, max_tokens=200, stream=stream)
    if stream:
        message = assemble(reply)["message"]
        content, reasoning = message["content"], message["reasoning_content"]
    else:
        message = reply.choices[0].message
        content, reasoning = message.content, message.reasoning_content
    assert reasoning is not None and "</think>" not in reasoning
    jsonschema.validate(json.loads(content), PERSON)


@pytest.mark.parametrize("field,value,check", [
    ("response_format", {"type": "json_object"}, lambda text: isinstance(json.loads(text), dict)),
    ("guided_json", PERSON, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ("guided_regex", r"[A-Z][a-z]{1,8} \d{3}", lambda text: re.fullmatch(r"[A-Z][a-z]{1,8} \d{3}", text)),
    ("guided_choice", ["Paris", "Oslo"], lambda text: text in ("Paris", "Oslo")),
    ("structured_outputs", {"grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),
    ("structured_outputs", {"json": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
])
def test_every_format_field_is_enforced(bundled_server, field, value, check):
    client = bundled_server.openai()
    reply = client.chat.completions.create(model=tiny.NAME, messages=ASK, temperature=0.7, seed=1, max_tokens=150,
                                           extra_body={field: value, **NO_THINKING})
    assert reply.choices[0].finish_reason == "stop" and check(reply.choices[0].message.content)


def test_completions_take_the_same_fields(bundled_server):
    client = bundled_server.openai()
    reply = client.completions.create(model=tiny.NAME, prompt="The city is", max_tokens=20, temperature=0.9,
                                      extra_body={"structured_outputs": {"choice": ["Paris", "Oslo", "Rome"]}})
    assert reply.choices[0].text in ("Paris", "Oslo", "Rome")


@pytest.mark.parametrize("parallel", [None, False])
def test_required_tool_choice_gives_valid_calls_for_20_requests(bundled_server, parallel):
    examples = [tool_calls(seed) for seed in range(20)]
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    replies = gather(bundled_server, [dict(messages=e.prompt_messages, tools=e.tools, tool_choice="required",
                                           temperature=0.7, seed=i, max_tokens=150, **extra)
                                      for i, e in enumerate(examples)])
    for reply, example in zip(replies, examples):
        assert reply.choices[0].finish_reason == "tool_calls"
        check_calls(reply.choices[0].message, example)
        if parallel is False:
            assert len(reply.choices[0].message.tool_calls) == 1


def test_named_tool_choice_gives_a_call_of_that_function_for_20_requests(bundled_server):
    examples = [tool_calls(seed) for seed in range(20)]
    names = [json.loads(e.answer)["name"] for e in examples]
    replies = gather(bundled_server, [dict(messages=e.prompt_messages, tools=e.tools, temperature=0.7, seed=i,
                                           tool_choice={"type": "function", "function": {"name": name}},
                                           max_tokens=150) for i, (e, name) in enumerate(zip(examples, names))])
    for reply, example, name in zip(replies, examples, names):
        check_calls(reply.choices[0].message, example)
        assert [call.function.name for call in reply.choices[0].message.tool_calls] == [name]
        assert reply.choices[0].finish_reason == "stop"  # as vLLM and OpenAI answer a named call


def test_auto_with_parallel_tool_calls_false_gives_at_most_one_valid_call(bundled_server):
    examples = [tool_calls(seed) for seed in range(6)]
    replies = gather(bundled_server, [dict(messages=e.prompt_messages, tools=e.tools, parallel_tool_calls=False,
                                           temperature=0.7, seed=i, max_tokens=150) for i, e in enumerate(examples)])
    for reply, example in zip(replies, examples):
        check_calls(reply.choices[0].message, example)
        assert len(reply.choices[0].message.tool_calls) == 1


def test_streamed_required_call(bundled_server):
    example = tool_calls(3)
    stream = bundled_server.openai().chat.completions.create(
        model=tiny.NAME, messages=example.prompt_messages, tools=example.tools, tool_choice="required",
        temperature=0.7, seed=3, max_tokens=150, stream=True)
    result = assemble(stream)
    assert result["finish_reason"] == "tool_calls"
    [call] = result["message"]["tool_calls"]
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in example.tools}
    jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_auto_with_a_response_format_gives_calls_or_valid_content(bundled_server):
    """vLLM drops the tool calls when a response format is set (#16313, #39929): here either may come, each valid."""
    call = tool_calls(11)
    answer = tasks.generate("tool_use", 11, stage="answer")  # after the tool's reply the model writes its answer
    assert answer.tools == call.tools
    replies = gather(bundled_server, [dict(messages=messages, tools=call.tools, tool_choice="auto",
                                           response_format=person_format(), temperature=0.7, seed=seed,
                                           max_tokens=200, extra_body=NO_THINKING)
                                      for messages in (call.prompt_messages, openai_messages(answer.prompt_messages))
                                      for seed in range(4)])
    kinds = set()
    for reply in replies:
        message = reply.choices[0].message
        if message.tool_calls:
            check_calls(message, call)
            assert reply.choices[0].finish_reason == "tool_calls" and not message.content
            kinds.add("calls")
        else:
            jsonschema.validate(json.loads(message.content), PERSON)
            kinds.add("content")
    assert kinds == {"calls", "content"}


def test_parse_returns_the_pydantic_object(bundled_server):
    class Employee(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=18, le=70)
        city: str = Field(max_length=12)

    reply = bundled_server.openai().chat.completions.parse(model=tiny.NAME, messages=ASK, response_format=Employee,
                                                           temperature=0.7, seed=5, max_tokens=200)
    employee = reply.choices[0].message.parsed
    assert isinstance(employee, Employee) and 18 <= employee.age <= 70


@pytest.mark.parametrize("body,param,says", [
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}),
     "response_format.json_schema.schema", "'uniqueItems' (at '/uniqueItems')"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}),
     "response_format.json_schema.schema", "strng"),
    (dict(guided_regex="(unclosed"), "guided_regex", "regex"),
    (dict(structured_outputs={"grammar": "root ::= missing_rule"}), "structured_outputs", "missing_rule"),
    (dict(structured_outputs={"json": PERSON, "regex": "a"}), "structured_outputs", "exactly one"),
    (dict(guided_choice=["a"], response_format={"type": "json_object"}), "guided_choice", "only one of"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
          tool_choice="required"), "tools.0.function.parameters", "'not'"),
])
def test_bad_schemas_are_400_and_the_server_keeps_serving(bundled_server, body, param, says):
    with bundled_server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": tiny.NAME, "messages": ASK, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and says in error["message"], error
        reply = http.post("/v1/chat/completions", json={"model": tiny.NAME, "messages": ASK, "max_tokens": 100,
                                                        "response_format": person_format(), **NO_THINKING})
        jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), PERSON)
    assert bundled_server.async_engine.stats["num_blocks_used"] == 0


def test_kv_blocks_come_back_after_a_constrained_stream_is_dropped(bundled_server):
    body = {"model": tiny.NAME, "messages": tool_calls(2).prompt_messages, "tools": tool_calls(2).tools,
            "tool_choice": "required", "stream": True, "max_tokens": 100}
    with httpx.Client(base_url=bundled_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            next(response.iter_lines())  # the first chunk: the request is running
    deadline = time.monotonic() + 30
    while bundled_server.async_engine.stats["num_blocks_used"] or bundled_server.async_engine.num_pending_requests:
        assert time.monotonic() < deadline, bundled_server.async_engine.stats
        time.sleep(0.05)


def test_a_compiling_grammar_does_not_hold_up_other_requests(bundled_server, monkeypatch):
    manager = bundled_server.engine.structured_output
    release = threading.Event()
    compile_now = manager._compile
    monkeypatch.setattr(manager, "_compile", lambda grammar: release.wait(30) and compile_now(grammar))
    schema = PERSON | {"title": "compiled while others run"}
    client = bundled_server.openai()
    slow = threading.Thread(target=lambda: results.append(client.chat.completions.create(
        model=tiny.NAME, messages=ASK, max_tokens=100, extra_body=NO_THINKING,
        response_format={"type": "json_schema", "json_schema": {"name": "slow", "schema": schema}})))
    results = []
    slow.start()
    try:
        quick = client.chat.completions.create(model=tiny.NAME, messages=ASK, max_tokens=8)
        assert quick.usage.completion_tokens > 0 and not results  # answered while the other grammar compiles
    finally:
        release.set()
        slow.join(60)
    jsonschema.validate(json.loads(results[0].choices[0].message.content), schema)


def test_openai_client_sees_400_as_bad_request(bundled_server):
    with pytest.raises(openai.BadRequestError, match="cannot be enforced"):
        bundled_server.openai().chat.completions.create(model=tiny.NAME, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "regex"}}})
