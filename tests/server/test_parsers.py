"""The qwen3 and gemma4 reasoning parsers and the hermes / qwen3_coder / gemma4 tool parsers on scripted model
outputs.

Each case is parsed whole (non-streamed) and as a stream: cut at every character and at the real tokenizer's token
boundaries, with the deltas the server would send put back together. Both must give the same message.
"""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from mixquant.server.chat import message_delta
from mixquant.server.parsers import (
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    ChatOutputParser,
    Gemma4ReasoningParser,
    Gemma4ToolParser,
    HermesToolParser,
    ParsedOutput,
    ParsedToolCall,
    Qwen3CoderToolParser,
    Qwen3ReasoningParser,
)
from mixquant.server.protocol import ToolDefinition
from tests.data import qwen3_tokenizer

WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
WEATHER = ParsedToolCall("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
TIME = ParsedToolCall("get_time", json.dumps({"zone": "CET"}))
MALFORMED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
# Qwen3.5's XML calls: every value is text, typed by the request's tool schema
XML_WEATHER_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\n"
                    "celsius\n</parameter>\n</function>\n</tool_call>")
XML_TOOLS = [ToolDefinition.model_validate({"type": "function", "function": {
    "name": "plan", "parameters": {"type": "object", "properties": {
        "days": {"type": "integer"}, "budget": {"type": "number"}, "ok": {"type": "boolean"},
        "stops": {"type": "array"}, "code": {"type": "string"}, "note": {"type": ["string", "null"]}}}}})]
XML_PLAN_CALL = ("<tool_call>\n<function=plan>\n<parameter=days>\n3\n</parameter>\n<parameter=budget>\n12.5\n"
                 "</parameter>\n<parameter=ok>\ntrue\n</parameter>\n<parameter=stops>\n[\"Lyon\", \"Nice\"]\n"
                 "</parameter>\n<parameter=code>\n007\n</parameter>\n<parameter=note>\nline one\nline two\n"
                 "</parameter>\n<parameter=extra>\n5\n</parameter>\n</function>\n</tool_call>")
PLAN = ParsedToolCall("plan", json.dumps({"days": 3, "budget": 12.5, "ok": True, "stops": ["Lyon", "Nice"],
                                          "code": "007", "note": "line one\nline two", "extra": "5"}))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer()))


def streamed(parser: ChatOutputParser, text: str, cuts: list[int]) -> ParsedOutput:
    """The message a client assembles from the server's deltas when the text arrives cut at `cuts`."""
    reasoning, content, calls = "", "", []
    sent = ParsedOutput()
    for end in [*cuts, len(text)]:
        parsed = parser.parse(text[:end], final=end == len(text))
        delta = message_delta(sent, parsed)
        if delta is not None:
            assert delta.reasoning == delta.reasoning_content
            reasoning += delta.reasoning or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                assert call.index == len(calls)
                calls.append(ParsedToolCall(call.function.name, call.function.arguments))
        sent = parsed
    return ParsedOutput(reasoning, content, calls)


def check(parser: ChatOutputParser, text: str, expected: ParsedOutput, tokenizer):
    assert parser.parse(text, final=True) == expected
    assert streamed(parser, text, list(range(len(text)))) == expected
    token_ends, position = [], 0
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        position += len(tokenizer.decode([token]))
        token_ends.append(position)
    assert streamed(parser, text, token_ends) == expected


REASONING = ChatOutputParser(Qwen3ReasoningParser())
HERMES = ChatOutputParser(tools=HermesToolParser())
BOTH = ChatOutputParser(Qwen3ReasoningParser(), HermesToolParser())
XML = ChatOutputParser(Qwen3ReasoningParser(), Qwen3CoderToolParser(XML_TOOLS))

CASES = {
    "reasoning then answer": (
        REASONING, "<think>\nTwo plus two.\n</think>\n\nThe answer is 4.",
        ParsedOutput("\nTwo plus two.\n", "\n\nThe answer is 4.")),
    "think tag from the prompt": (
        REASONING, "Two plus two.\n</think>\n\n4", ParsedOutput("Two plus two.\n", "\n\n4")),
    "unterminated reasoning is all reasoning": (
        REASONING, "<think>\nStill thinking about </thi", ParsedOutput("\nStill thinking about </thi", "")),
    "thinking off: everything is content": (
        ChatOutputParser(Qwen3ReasoningParser(thinking_enabled=False)), "No <think> here</think>, just text",
        ParsedOutput("", "No <think> here</think>, just text")),
    "text that only looks like tags": (
        BOTH, "<think>a < b</think>x <tool is <not> a <tool_call",
        ParsedOutput("a < b", "x <tool is <not> a <tool_call")),
    "hermes call after text": (
        HERMES, f"Let me check.\n{WEATHER_CALL}", ParsedOutput("", "Let me check.\n", [WEATHER])),
    "two hermes calls": (
        HERMES, f"{WEATHER_CALL}\n{TIME_CALL}", ParsedOutput("", "", [WEATHER, TIME])),
    "malformed call stays content": (
        HERMES, f"Checking. {MALFORMED_CALL}", ParsedOutput("", f"Checking. {MALFORMED_CALL}")),
    "malformed beside a valid call": (
        HERMES, f"{MALFORMED_CALL}\n{TIME_CALL} done", ParsedOutput("", f"{MALFORMED_CALL}\n done", [TIME])),
    "unterminated valid call counts at the end": (
        HERMES, '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}',
        ParsedOutput("", "", [TIME])),
    "unterminated malformed call stays content": (
        HERMES, 'Sure <tool_call>\n{"name": "get_time", "argu',
        ParsedOutput("", 'Sure <tool_call>\n{"name": "get_time", "argu')),
    "arguments encoded twice, or missing": (
        HERMES, ('<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
                 '<tool_call>{"name": "now"}</tool_call>'),
        ParsedOutput("", "", [TIME, ParsedToolCall("now", "{}")])),
    "arguments that are not an object": (
        HERMES, '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
        ParsedOutput("", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>')),
    "reasoning then a call": (
        BOTH, f"<think>\nI need the weather.\n</think>\n\n{WEATHER_CALL}",
        ParsedOutput("\nI need the weather.\n", "", [WEATHER])),
    "calls inside reasoning are not calls": (
        BOTH, f"<think>{WEATHER_CALL}</think>No call.", ParsedOutput(WEATHER_CALL, "No call.")),
    "truncated while thinking, before any call": (
        BOTH, f"<think>\nmaybe {WEATHER_CALL}", ParsedOutput(f"\nmaybe {WEATHER_CALL}", "")),
    "xml call after reasoning closed by the template's think tag": (
        XML, f"I need the weather.\n</think>\n\n{XML_WEATHER_CALL}",
        ParsedOutput("I need the weather.\n", "", [WEATHER])),
    "xml call typed by the tool schema; unknown parameters stay text": (
        XML, f"</think>{XML_PLAN_CALL}", ParsedOutput("", "", [PLAN])),
    "xml call opened while thinking ends the reasoning": (
        XML, f"Checking.\n{XML_WEATHER_CALL}", ParsedOutput("Checking.\n", "", [WEATHER])),
    "two xml calls, text between": (
        XML, f"</think>One.\n{XML_WEATHER_CALL}\nand {XML_PLAN_CALL}",
        ParsedOutput("", "One.\n\nand ", [WEATHER, PLAN])),
    "xml block without a function stays content": (
        XML, "</think>See <tool_call>\nnothing\n</tool_call>",
        ParsedOutput("", "See <tool_call>\nnothing\n</tool_call>")),
    "unterminated xml call counts at the end": (
        XML, "</think><tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n",
        ParsedOutput("", "", [ParsedToolCall("get_weather", '{"city": "Paris"}')])),
    "a json tool call is no xml call": (
        XML, f"</think>{WEATHER_CALL}", ParsedOutput("", WEATHER_CALL)),
}


@pytest.mark.parametrize("name", CASES)
def test_parsed_whole_and_streamed_alike(name, tokenizer):
    parser, text, expected = CASES[name]
    check(parser, text, expected, tokenizer)


def test_partial_results_only_grow():
    """What streaming relies on: a parse of a prefix is a prefix of the parse of anything longer."""
    text = f"<think>\nplan</think>\n\nText {MALFORMED_CALL} more\n{WEATHER_CALL}\n \n{TIME_CALL}\n"
    previous = ParsedOutput()
    for end in range(len(text) + 1):
        parsed = BOTH.parse(text[:end], final=False)
        assert parsed.reasoning.startswith(previous.reasoning)
        assert parsed.content.startswith(previous.content)
        assert parsed.tool_calls[:len(previous.tool_calls)] == previous.tool_calls
        previous = parsed
    assert BOTH.parse(text, final=True).content.startswith(previous.content)


# ---- Gemma 4 (vLLM's gemma4 parsers): its markers are special tokens, kept in the text for these parsers ---------

def gemma_call(name: str, arguments: str) -> str:
    return f"<|tool_call>call:{name}{arguments}<tool_call|>"


Q = '<|"|>'  # Gemma's string delimiter
GEMMA_WEATHER = gemma_call("get_weather", f"{{city:{Q}Paris{Q},unit:{Q}celsius{Q}}}")
GEMMA_TIME = gemma_call("get_time", f"{{zone:{Q}CET{Q}}}")
GEMMA_BOTH = ChatOutputParser(Gemma4ReasoningParser(), Gemma4ToolParser())
GEMMA_TOOLS = ChatOutputParser(tools=Gemma4ToolParser())
THOUGHT = "<|channel>thought\nI need the weather.<channel|>"

GEMMA_CASES = {
    "thought then answer": (
        ChatOutputParser(Gemma4ReasoningParser()), f"{THOUGHT}It is sunny.",
        ParsedOutput("I need the weather.", "It is sunny.")),
    "no thought channel: all content": (
        ChatOutputParser(Gemma4ReasoningParser()), "<b>Sunny</b>, 21 degrees.",
        ParsedOutput("", "<b>Sunny</b>, 21 degrees.")),
    "thinking off: a channel is content": (
        ChatOutputParser(Gemma4ReasoningParser(thinking_enabled=False)), f"{THOUGHT}x",
        ParsedOutput("", f"{THOUGHT}x")),
    "cut off while thinking": (
        GEMMA_BOTH, f"<|channel>thought\nmaybe {GEMMA_WEATHER}", ParsedOutput(f"maybe {GEMMA_WEATHER}", "")),
    "thought, words, a call, and the hand-over to the tool": (
        GEMMA_BOTH, f"{THOUGHT}Let me check.{GEMMA_WEATHER}<|tool_response>",
        ParsedOutput("I need the weather.", "Let me check.", [WEATHER])),
    "two calls": (GEMMA_TOOLS, f"{GEMMA_WEATHER}{GEMMA_TIME}", ParsedOutput("", "", [WEATHER, TIME])),
    "nested arguments, numbers, booleans, null": (
        GEMMA_TOOLS, gemma_call("book", f"{{guests:2,price:-1.5,vip:true,note:null,rooms:[{{beds:2}},{Q}suite{Q}]}}"),
        ParsedOutput("", "", [ParsedToolCall("book", json.dumps(
            {"guests": 2, "price": -1.5, "vip": True, "note": None, "rooms": [{"beds": 2}, "suite"]}))])),
    "delimited strings keep commas, braces and colons": (
        GEMMA_TOOLS, gemma_call("say", f"{{text:{Q}a, {{b}}: c{Q}}}"),
        ParsedOutput("", "", [ParsedToolCall("say", json.dumps({"text": "a, {b}: c"}))])),
    "no arguments": (GEMMA_TOOLS, gemma_call("now", "{}"), ParsedOutput("", "", [ParsedToolCall("now", "{}")])),
    "malformed call stays content": (
        GEMMA_TOOLS, f"Trying {gemma_call('get_weather', '{city:}')} now",
        ParsedOutput("", f"Trying {gemma_call('get_weather', '{city:}')} now")),
    "unterminated call counts at the end": (
        GEMMA_TOOLS, f"<|tool_call>call:get_time{{zone:{Q}CET{Q}}}", ParsedOutput("", "", [TIME])),
    "text that only looks like markers": (
        GEMMA_BOTH, "a <|tool is <not> a <|tool_call", ParsedOutput("", "a <|tool is <not> a <|tool_call")),
    "calls inside the thought are not calls": (
        GEMMA_BOTH, f"<|channel>thought\n{GEMMA_WEATHER}<channel|>No call.", ParsedOutput(GEMMA_WEATHER, "No call.")),
}


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from tests.conftest import gemma4_tokenizer

    return gemma4_tokenizer()


@pytest.mark.parametrize("name", GEMMA_CASES)
def test_gemma_parsed_whole_and_streamed_alike(name, gemma_tokenizer):
    parser, text, expected = GEMMA_CASES[name]
    check(parser, text, expected, gemma_tokenizer)


def test_gemma_parsers_keep_special_tokens_and_are_registered():
    assert REASONING_PARSERS["gemma4"] is Gemma4ReasoningParser and TOOL_CALL_PARSERS["gemma4"] is Gemma4ToolParser
    assert GEMMA_BOTH.needs_special_tokens and not BOTH.needs_special_tokens
