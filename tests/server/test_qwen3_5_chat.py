"""Qwen3.5's chat format through the server: its template (tools, XML calls in the history, thinking opened by the
prompt), the qwen3_coder tool parser and the reasoning split on scripted outputs, streamed and not, and a tiny
Qwen3.5 served end to end."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.server.conftest import MODEL_NAME, running_server, server_config, tiny_engine
from tests.server.scripted_engine import ScriptedEngine
from tests.server.test_tool_calls_end_to_end import assemble

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n"
        "</parameter>\n</function>\n</tool_call>")
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tiny_qwen3_5, tmp_path_factory):
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(str(tiny_qwen3_5)))
    config = server_config(tmp_path_factory.mktemp("scripted-qwen3.5"), tool_call_parser="qwen3_coder")
    with running_server(engine, config) as running:
        yield running


def ask(server, script: str, stream: bool = False, **kwargs):
    server.engine.script = script
    return server.openai().chat.completions.create(model=MODEL_NAME, messages=kwargs.pop("messages", MESSAGES),
                                                   tools=TOOLS, stream=stream, **kwargs)


def rendered(server, **body) -> str:
    with server.http() as http:
        tokens = http.post("/tokenize", json=body).json()["tokens"]
        return http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]


def test_history_renders_calls_as_xml_and_the_prompt_opens_thinking(scripted):
    history = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "user", "content": "And tomorrow?"}]
    prompt = rendered(scripted, messages=history, tools=TOOLS)
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in prompt
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>" in prompt
    assert "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    not_thinking = rendered(scripted, messages=MESSAGES, chat_template_kwargs={"enable_thinking": False})
    assert not_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("stream", [False, True])
def test_xml_call_after_reasoning(scripted, stream):
    response = ask(scripted, f"The user wants the weather.\n</think>\n\n{CALL}", stream=stream)
    if stream:
        result = assemble(response)
        message, finish_reason = result["message"], result["finish_reason"]
        reasoning, content = message["reasoning"], message["content"] or None
        calls = [(c["name"], c["arguments"]) for c in message["tool_calls"]]
    else:
        choice = response.choices[0]
        reasoning, content, finish_reason = choice.message.reasoning_content, choice.message.content, \
            choice.finish_reason
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert reasoning == "The user wants the weather.\n" and content is None and finish_reason == "tool_calls"
    [(name, arguments)] = calls
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris", "days": 2}


def test_xml_call_opened_while_thinking_ends_the_reasoning(scripted):
    choice = ask(scripted, f"Checking the weather.\n{CALL}").choices[0]
    assert choice.message.reasoning_content == "Checking the weather.\n"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]


def test_tiny_qwen3_5_is_served(tiny_qwen3_5, tmp_path_factory):
    """The real engine behind the server: a chat with tools and a streamed completion come back whole."""
    engine = tiny_engine(tiny_qwen3_5, block_size=4)
    with running_server(engine, server_config(tiny_qwen3_5, tool_call_parser="qwen3_coder")) as running:
        client = running.openai()
        chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                              temperature=0)
        assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "length"
        stream = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=4, temperature=0,
                                           stream=True)
        assert sum(1 for chunk in stream for _ in chunk.choices) >= 4
    assert engine.stats()["state_slots_used"] == 0
