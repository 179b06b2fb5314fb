"""Generated text -> reasoning, content and tool calls (vLLM's `--reasoning-parser qwen3|gemma4`, `--tool-call-parser
hermes|gemma4` and `qwen3_coder`, the XML calls of Qwen3-Coder and Qwen3.5).

Every parser is a pure function of the text generated so far. With `final=False` (the text is still growing) it
holds back whatever the next tokens could still change (half a tag, an unclosed tool call, trailing whitespace
that may precede one), so each result only ever extends the previous one. Streaming therefore sends the difference
between successive parses, and a streamed response always adds up to the non-streamed one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# An XML tool call (Qwen3.5) opened before </think> ends the reasoning there, as vLLM's qwen3 parser reads it.
XML_CALL_START = TOOL_CALL_START + "\n<function="


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the beginning of `tag` (it may become the tag)."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object as text, ready for the response's `arguments`


@dataclass(frozen=True)
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


# ---- reasoning -----------------------------------------------------------------------------------------------------

class Qwen3ReasoningParser:
    """`<think>reasoning</think>content`. The opening tag may be in the prompt (newer templates) or generated.

    Thinking on and no `</think>` yet: everything is reasoning (a response cut off while thinking has no answer),
    up to an XML tool call, which ends it. Thinking off (`enable_thinking: false`): the template closed the think
    block itself, so all is content.
    """

    end = THINK_END  # where content (and a structured output's constraint) starts

    def __init__(self, thinking_enabled: bool = True):
        self.thinking_enabled = thinking_enabled

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content)."""
        if not self.thinking_enabled:
            return "", text
        if text.startswith(THINK_START):
            text = text[len(THINK_START):]
        elif not final and THINK_START.startswith(text):
            return "", ""
        call, end = text.find(XML_CALL_START), text.find(THINK_END)
        if call >= 0 and (end < 0 or call < end):
            return text[:call], text[call:]
        if end >= 0:
            return text[:end], text[end + len(THINK_END):]
        if not final:
            text = text[:len(text) - max(partial_tag_length(text, THINK_END), partial_tag_length(text, XML_CALL_START))]
        return text, ""


# ---- tool calls ----------------------------------------------------------------------------------------------------

def parse_tool_call(body: str) -> ParsedToolCall | None:
    """`{"name": ..., "arguments": {...}}` (or "parameters", or arguments as a JSON string); None if it is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models encode the arguments twice
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser(Protocol):
    def extract(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """(content, tool calls)."""


class TaggedToolParser:
    """`<tool_call>...</tool_call>` blocks (or a subclass's `start` ... `end`) become tool calls (`parse_body` reads
    one); an unclosed block at the end counts once final. A block that is not a tool call stays in the content where
    it was, as do the words around the blocks: nothing the model wrote is dropped. Built per request, with the
    request's tools."""

    start, end = TOOL_CALL_START, TOOL_CALL_END
    held_tags = (TOOL_CALL_START,)  # a content end that may become one of these is held back while streaming

    def __init__(self, tools: list | None = None):
        self.tools = tools or []

    def parse_body(self, body: str) -> ParsedToolCall | None:
        raise NotImplementedError

    def extract(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """(content, tool calls)."""
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        position = 0
        while True:
            start = text.find(self.start, position)
            if start < 0:
                rest = text[position:]
                if not final:
                    rest = rest[:len(rest) - max(partial_tag_length(rest, tag) for tag in self.held_tags)]
                content.append(rest)
                break
            content.append(text[position:start])
            end = text.find(self.end, start)
            if end < 0 and not final:
                break  # still being written
            body_end = len(text) if end < 0 else end
            block_end = len(text) if end < 0 else end + len(self.end)
            call = self.parse_body(text[start + len(self.start):body_end])
            if call is None:
                content.append(text[start:block_end])
            else:
                calls.append(call)
            position = block_end
        joined = "".join(content)
        if not final:
            return joined.rstrip(), calls  # trailing whitespace may only separate the text from a tool call
        return (joined if joined.strip() else ""), calls


class HermesToolParser(TaggedToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3)."""

    def parse_body(self, body: str) -> ParsedToolCall | None:
        return parse_tool_call(body)


FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*|$)", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


class Qwen3CoderToolParser(TaggedToolParser):
    """`<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>` (Qwen3-Coder,
    Qwen3.5). Values are written as text: each becomes the JSON value its parameter's type in the request's tool
    schema asks for (a string stays a string, `2` of an integer parameter becomes 2); text that is not of that type,
    and the values of parameters the schema does not name, stay strings."""

    def parse_body(self, body: str) -> ParsedToolCall | None:
        function = FUNCTION.fullmatch(body)
        if function is None:
            return None
        name = function[1].strip()
        schema = next((tool.function.parameters or {} for tool in self.tools if tool.function.name == name), {})
        properties = schema.get("properties") or {}
        arguments = {}
        for parameter in PARAMETER.finditer(function[2]):
            key = parameter[1].strip()
            arguments[key] = typed_value(parameter[2].removeprefix("\n").removesuffix("\n"), properties.get(key))
        return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False))


def typed_value(text: str, schema: dict | None) -> Any:
    """A parameter's text as the JSON value of its schema's type (the first non-null one of a list of types)."""
    kind = (schema or {}).get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "string":
        return text
    if text.strip() == "null":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    accepted = {"integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}.get(kind)
    if accepted is None or (isinstance(value, bool) and kind != "boolean") or not isinstance(value, accepted):
        return text
    return value


# ---- Gemma 4 -------------------------------------------------------------------------------------------------------
# Its control tokens are special tokens, which detokenization drops by default: the server keeps them in the text
# for these parsers (`needs_special_tokens`, as vLLM's gemma4 parsers set skip_special_tokens=False).

GEMMA_CHANNEL_START, GEMMA_CHANNEL_END, GEMMA_THOUGHT = "<|channel>", "<channel|>", "thought\n"
GEMMA_CALL_START, GEMMA_CALL_END, GEMMA_STRING = "<|tool_call>", "<tool_call|>", '<|"|>'
GEMMA_RESPONSE_START = "<|tool_response>"


class Gemma4ReasoningParser:
    """`<|channel>thought\nreasoning<channel|>content`: the model opens the thought channel itself, so text that
    does not begin with it is all content; the `thought` label is not reasoning. Thinking off
    (`enable_thinking: false`, Gemma's default): the template closed an empty channel in the prompt, all is
    content."""

    end = GEMMA_CHANNEL_END
    needs_special_tokens = True

    def __init__(self, thinking_enabled: bool = True):
        self.thinking_enabled = thinking_enabled

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content)."""
        if not self.thinking_enabled:
            return "", text
        opening = GEMMA_CHANNEL_START + GEMMA_THOUGHT
        if not text.startswith(GEMMA_CHANNEL_START):
            return ("", "") if not final and opening.startswith(text) else ("", text)
        if not final and opening.startswith(text):
            return "", ""  # the label is still coming
        body = text[len(GEMMA_CHANNEL_START):].removeprefix(GEMMA_THOUGHT)
        reasoning, closed, content = body.partition(GEMMA_CHANNEL_END)
        if closed:
            return reasoning, content
        if not final:
            reasoning = reasoning[:len(reasoning) - partial_tag_length(reasoning, GEMMA_CHANNEL_END)]
        return reasoning, ""


def parse_gemma_arguments(text: str) -> dict:
    """Gemma's argument object `{key:value,...}` -> a dict: bare keys, strings between `<|"|>` delimiters, numbers,
    true/false/null, nested objects and arrays; a bare word that is none of these is taken as a string. ValueError
    unless the whole text is one object."""
    value, end = _gemma_value(text, 0)
    if not isinstance(value, dict) or text[end:].strip():
        raise ValueError(f"not one Gemma argument object: {text!r}")
    return value


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _gemma_value(text: str, i: int):
    """The value starting at text[i] (after spaces) and the index after it."""
    i = _skip_space(text, i)
    if text.startswith(GEMMA_STRING, i):
        end = text.find(GEMMA_STRING, i + len(GEMMA_STRING))
        if end < 0:
            raise ValueError("unterminated string")
        return text[i + len(GEMMA_STRING):end], end + len(GEMMA_STRING)
    if text.startswith("{", i):
        return _gemma_items(text, i + 1, "}", keyed=True)
    if text.startswith("[", i):
        return _gemma_items(text, i + 1, "]", keyed=False)
    end = i
    while end < len(text) and text[end] not in ",}]":
        end += 1
    word = text[i:end].strip()
    if not word:
        raise ValueError(f"a value is missing at {i}")
    bare = {"true": True, "false": False, "null": None}
    if word in bare:
        return bare[word], end
    try:
        return json.loads(word) if word[0] in "-0123456789" else word, end
    except json.JSONDecodeError:
        return word, end


def _gemma_items(text: str, i: int, close: str, keyed: bool):
    """An object's `key:value` or an array's values up to `close`, from just after the opening bracket."""
    items: dict | list = {} if keyed else []
    i = _skip_space(text, i)
    if text.startswith(close, i):
        return items, i + 1
    while True:
        if keyed:
            colon = text.find(":", i)
            if colon < 0:
                raise ValueError(f"a key without a value at {i}")
            key = text[i:colon].strip().removeprefix(GEMMA_STRING).removesuffix(GEMMA_STRING)
            value, i = _gemma_value(text, colon + 1)
            items[key] = value
        else:
            value, i = _gemma_value(text, i)
            items.append(value)
        i = _skip_space(text, i)
        if text.startswith(close, i):
            return items, i + 1
        if not text.startswith(",", i):
            raise ValueError(f"expected ',' or {close!r} at {i}")
        i = _skip_space(text, i + 1)


class Gemma4ToolParser(TaggedToolParser):
    """`<|tool_call>call:name{arguments}<tool_call|>` blocks, their arguments in Gemma's notation turned into JSON.
    `<|tool_response>` after a call block is the model handing over to the tool: its turn ends there, so nothing
    from it on is content."""

    start, end = GEMMA_CALL_START, GEMMA_CALL_END
    held_tags = (GEMMA_CALL_START, GEMMA_RESPONSE_START)
    needs_special_tokens = True

    def parse_body(self, body: str) -> ParsedToolCall | None:
        """`call:name{arguments}`; None if it is not one."""
        body = body.strip()
        name, brace, arguments = body.removeprefix("call:").partition("{")
        if not body.startswith("call:") or not brace or not name.strip() or any(c.isspace() for c in name.strip()):
            return None
        try:
            parsed = parse_gemma_arguments(brace + arguments)
        except ValueError:
            return None
        return ParsedToolCall(name.strip(), json.dumps(parsed, ensure_ascii=False))

    def extract(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        closed = text.find(GEMMA_CALL_END)
        handover = -1 if closed < 0 else text.find(GEMMA_RESPONSE_START, closed)
        if handover >= 0:
            return super().extract(text[:handover], final=True)
        return super().extract(text, final)


# ---- both ----------------------------------------------------------------------------------------------------------

class ChatOutputParser:
    """Reasoning first; tool calls are looked for in the content only, never inside the reasoning."""

    def __init__(self, reasoning: Qwen3ReasoningParser | Gemma4ReasoningParser | None = None,
                 tools: ToolParser | None = None):
        self.reasoning = reasoning
        self.tools = tools

    @property
    def needs_special_tokens(self) -> bool:
        """Whether the text must keep the tokenizer's special tokens (Gemma's markers are special tokens)."""
        return any(getattr(part, "needs_special_tokens", False) for part in (self.reasoning, self.tools))

    def parse(self, text: str, final: bool) -> ParsedOutput:
        reasoning, content = self.reasoning.split(text, final) if self.reasoning else ("", text)
        calls: list[ParsedToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.extract(content, final)
        return ParsedOutput(reasoning, content, calls)


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser, "gemma4": Gemma4ReasoningParser}
TOOL_CALL_PARSERS = {"hermes": HermesToolParser, "qwen3_coder": Qwen3CoderToolParser, "gemma4": Gemma4ToolParser}
