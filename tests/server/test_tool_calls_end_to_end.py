"""Tool calls and reasoning from model output to the openai client, streamed and not (on the scripted engine)."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.data import qwen3_tokenizer
from tests.server.conftest import MODEL_NAME, running_server, server_config
from tests.server.scripted_engine import ScriptedEngine
from tests.server.test_chat_template import TOOLS

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK_THEN_CALL = f"<think>\nI need the weather.\n</think>\n\n{CALL}"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(str(qwen3_tokenizer())))
    with running_server(engine, server_config(tmp_path_factory.mktemp("scripted"))) as running:
        yield running


def ask(server, script: str, stream: bool = False, thinking: bool = False, **kwargs):
    """A chat request with TOOLS whose answer is `script`; with thinking on, text before </think> is reasoning."""
    server.engine.script = script
    return server.openai().chat.completions.create(
        model=MODEL_NAME, messages=kwargs.pop("messages", MESSAGES), tools=TOOLS, stream=stream,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **kwargs)


def assemble(stream) -> dict:
    """What a streaming client puts together from the deltas (the way LiteLLM and the openai helpers do)."""
    message = {"content": "", "reasoning": "", "reasoning_content": "", "tool_calls": {}}
    finish_reason = None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            message["content"] += delta.content or ""
            for field in ("reasoning", "reasoning_content"):
                message[field] += (delta.model_extra or {}).get(field) or ""
            for call in delta.tool_calls or []:
                entry = message["tool_calls"].setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish_reason = choice.finish_reason or finish_reason
    message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
    return {"message": message, "finish_reason": finish_reason}


def test_tool_call_with_reasoning(scripted):
    choice = ask(scripted, THINK_THEN_CALL, thinking=True).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "\nI need the weather.\n"
    [call] = choice.message.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_call_with_reasoning(scripted):
    result = assemble(ask(scripted, THINK_THEN_CALL, stream=True, thinking=True))
    assert result["finish_reason"] == "tool_calls"
    message = result["message"]
    assert message["reasoning"] == message["reasoning_content"] == "\nI need the weather.\n"
    assert message["content"] == ""
    [call] = message["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-") and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}


def test_tool_call_round_trips_into_the_next_turn(scripted):
    first = ask(scripted, f"Let me look that up.\n{CALL}").choices[0].message
    assert first.content == "Let me look that up.\n" and len(first.tool_calls) == 1
    history = [*MESSAGES, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temperature": 21}'}]
    second = ask(scripted, "It is 21 degrees.", messages=history).choices[0]
    assert second.message.content == "It is 21 degrees." and second.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_tool_json_is_returned_as_content(scripted, stream):
    script = 'Trying: <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    response = ask(scripted, script, stream=stream)
    if stream:
        result = assemble(response)
        content, calls, finish_reason = result["message"]["content"], result["message"]["tool_calls"], \
            result["finish_reason"]
    else:
        choice = response.choices[0]
        content, calls, finish_reason = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert content == script and not calls and finish_reason == "stop"


def test_tool_choice_none_leaves_calls_in_content(scripted):
    choice = ask(scripted, CALL, tool_choice="none").choices[0]
    assert choice.message.content == CALL and not choice.message.tool_calls


def test_cut_off_while_thinking_is_all_reasoning(scripted):
    choice = ask(scripted, THINK_THEN_CALL, thinking=True, max_tokens=4).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None and not choice.message.tool_calls
    assert choice.message.reasoning_content and "</think>" not in choice.message.reasoning_content
