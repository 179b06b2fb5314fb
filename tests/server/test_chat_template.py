"""Qwen3's real chat template through the server: thinking on and off, tools and tool results in the history."""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL_NAME

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

HISTORY = [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "user", "content": "And should I take a coat?"},
]


def rendered(http, **body) -> str:
    response = http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return http.post("/detokenize", json={"tokens": response.json()["tokens"]}).json()["prompt"]


def reference(server, messages, tools=None, **kwargs) -> str:
    """The template rendered by transformers itself, with arguments as objects (what the server passes)."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if message.get("content") is None:
            message["content"] = ""
    return server.engine.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                       add_generation_prompt=True, **kwargs)


def test_thinking_on_and_off(http, server):
    messages = [{"role": "user", "content": "Hi"}]
    thinking = rendered(http, messages=messages)
    not_thinking = rendered(http, messages=messages, chat_template_kwargs={"enable_thinking": False})
    assert thinking == reference(server, [dict(m) for m in messages])
    assert thinking.endswith("<|im_start|>assistant\n")
    assert not_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tools_and_tool_results_render_as_the_template_says(http, server):
    prompt = rendered(http, messages=HISTORY, tools=TOOLS)
    assert prompt == reference(server, json.loads(json.dumps(HISTORY)), TOOLS)
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in prompt


def test_chat_with_tool_history_is_served(client, server):
    response = client.chat.completions.create(model=MODEL_NAME, messages=HISTORY, tools=TOOLS, max_tokens=4,
                                              temperature=0)
    prompt = reference(server, json.loads(json.dumps(HISTORY)), TOOLS)
    assert response.usage.prompt_tokens == len(server.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert response.choices[0].finish_reason in ("length", "stop")


def test_reasoning_sent_back_reaches_the_template(http):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning": "Two and two."}]
    prompt = rendered(http, messages=messages, add_generation_prompt=False)
    assert "<think>\nTwo and two.\n</think>\n\n4" in prompt


def test_chat_template_flag_replaces_the_tokenizers(server, tmp_path):
    from mixquant.server.chat import render_chat
    from mixquant.server.config import ServerConfig, load_chat_template
    from mixquant.server.protocol import ChatCompletionRequest
    from mixquant.server.serving import ServingContext

    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    (tmp_path / "plain.jinja").write_text(template)
    assert load_chat_template(str(tmp_path / "plain.jinja")) == load_chat_template(template) == template
    with pytest.raises(ValueError, match="not a file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    config = ServerConfig(served_model_names=["m"], model_path=str(tmp_path), chat_template=template)
    ctx = ServingContext(engine=None, config=config, tokenizer=server.engine.tokenizer, max_model_len=1024)
    messages = ChatCompletionRequest(messages=[{"role": "developer", "content": "Be brief."},
                                               {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]).messages
    assert render_chat(ctx, messages, None, {}, add_generation_prompt=True) == "[system]Be brief.[user]Hi>"
