"""A Gemma 4 checkpoint served with vLLM's gemma4 parsers: its chat format for tools and tool results, and its
thought channel and tool calls (special tokens, which the server keeps in the text for these parsers) parsed out,
streamed and not."""
from __future__ import annotations

import json

import pytest

from tests.conftest import gemma4_tokenizer
from tests.server.conftest import MODEL_NAME, running_server, server_config, tiny_engine
from tests.server.scripted_engine import ScriptedEngine
from tests.server.test_chat_template import HISTORY, TOOLS, reference, rendered
from tests.server.test_tool_calls_end_to_end import assemble

GEMMA = dict(reasoning_parser="gemma4", tool_call_parser="gemma4", enable_auto_tool_choice=True)
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
THOUGHT_THEN_CALL = f"<|channel>thought\nI need the weather.<channel|>Let me look.{CALL}<|tool_response>"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def test_tools_and_tool_results_in_gemmas_format(tiny_gemma4):
    """The template the test model ships (a real checkpoint brings its own) through the server, as the tokenizer
    renders it; and an answer is generated for the prompt, fp8/bf16."""
    engine = tiny_engine(tiny_gemma4, prefill_precision="fp8", decode_precision="bf16")
    with running_server(engine, server_config(tiny_gemma4, **GEMMA)) as server, server.http() as http:
        prompt = rendered(http, messages=HISTORY, tools=TOOLS)
        assert prompt == reference(server, json.loads(json.dumps(HISTORY)), TOOLS)
        assert prompt.startswith("<bos><|turn>system\nYou help with weather.<|tool>declaration:get_weather{")
        assert ('<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
                '<|tool_response>response:get_weather{value:<|"|>{"temperature": 21}<|"|>}<tool_response|>') in prompt
        assert prompt.endswith("<|turn>user\nAnd should I take a coat?<turn|>\n<|turn>model\n"
                               "<|channel>thought\n<channel|>")
        reply = server.openai().chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS,
                                                        max_tokens=6, temperature=0)
        assert reply.usage.prompt_tokens == len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert reply.usage.completion_tokens > 0
        assert engine.stats()["tokens_computed"]["prefill/fp8"] > 0


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    engine = ScriptedEngine(gemma4_tokenizer())
    with running_server(engine, server_config(tmp_path_factory.mktemp("scripted-gemma"), **GEMMA)) as running:
        yield running


def ask(server, script: str, stream: bool = False, thinking: bool = True, **kwargs):
    server.engine.script = script
    return server.openai().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, stream=stream,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_thought_and_tool_call(scripted, stream):
    response = ask(scripted, THOUGHT_THEN_CALL, stream=stream)
    if stream:
        result = assemble(response)
        message, finish_reason = result["message"], result["finish_reason"]
        reasoning, content, calls = message["reasoning"], message["content"], message["tool_calls"]
        names, arguments = [c["name"] for c in calls], [c["arguments"] for c in calls]
    else:
        choice = response.choices[0]
        finish_reason, message = choice.finish_reason, choice.message
        reasoning, content = message.reasoning_content, message.content
        names = [c.function.name for c in message.tool_calls]
        arguments = [c.function.arguments for c in message.tool_calls]
    assert finish_reason == "tool_calls"
    assert reasoning == "I need the weather." and content == "Let me look."
    assert names == ["get_weather"] and [json.loads(a) for a in arguments] == [{"city": "Paris"}]


def test_thinking_off_reads_all_as_content(scripted):
    choice = ask(scripted, "Sunny, 21 degrees.", thinking=False).choices[0]
    assert choice.message.content == "Sunny, 21 degrees." and choice.message.reasoning_content is None


def test_other_parsers_leave_special_tokens_out(tmp_path):
    """Without the gemma4 parsers the request's skip_special_tokens (default true) holds, as for any model."""
    engine = ScriptedEngine(gemma4_tokenizer())
    with running_server(engine, server_config(tmp_path, reasoning_parser=None, tool_call_parser=None,
                                              enable_auto_tool_choice=False)) as server:
        engine.script = THOUGHT_THEN_CALL
        reply = server.openai().chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
    assert reply.choices[0].message.content == "thought\nI need the weather.Let me look.call:get_weather{city:Paris}"
