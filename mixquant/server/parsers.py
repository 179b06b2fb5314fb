"""Generated text -> reasoning, content and tool calls (vLLM's `--reasoning-parser qwen3|gemma4`,
`--tool-call-parser hermes|gemma4`).

Every parser is a pure function of the text generated so far. With `final=False` (the text is still growing) it
holds back whatever the next tokens could still change (half a tag, an unclosed tool call, trailing whitespace
that may precede one), so each result only ever extends the previous one. Streaming therefore sends the difference
between successive parses, and a streamed response always adds up to the non-streamed one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


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

    Thinking on and no `</think>` yet: everything is reasoning (a response cut off while thinking has no answer).
    Thinking off (`enable_thinking: false`): the template closed the think block itself, so all is content.
    """

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
        reasoning, closed, content = text.partition(THINK_END)
        if closed:
            return reasoning, content
        if not final:
            reasoning = reasoning[:len(reasoning) - partial_tag_length(reasoning, THINK_END)]
        return reasoning, ""


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


class HermesToolParser:
    """`<tool_call>{json}</tool_call>` blocks become tool calls; an unclosed block at the end counts once final.

    A block whose JSON is not a tool call stays in the content where it was, as do the words around the blocks:
    nothing the model wrote is dropped.
    """

    def extract(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        position = 0
        while True:
            start = text.find(TOOL_CALL_START, position)
            if start < 0:
                rest = text[position:]
                if not final:
                    rest = rest[:len(rest) - partial_tag_length(rest, TOOL_CALL_START)]
                content.append(rest)
                break
            content.append(text[position:start])
            end = text.find(TOOL_CALL_END, start)
            if end < 0 and not final:
                break  # still being written
            body_end = len(text) if end < 0 else end
            block_end = len(text) if end < 0 else end + len(TOOL_CALL_END)
            call = parse_tool_call(text[start + len(TOOL_CALL_START):body_end])
            if call is None:
                content.append(text[start:block_end])
            else:
                calls.append(call)
            position = block_end
        joined = "".join(content)
        if not final:
            return joined.rstrip(), calls  # trailing whitespace may only separate the text from a tool call
        return (joined if joined.strip() else ""), calls


class NamedFunctionParser:
    """`tool_choice` naming a function. Nothing constrains the output, so it is read as that function's call when it
    is a hermes block, a `{"name", "arguments"}` object or a bare arguments object; otherwise it stays content.
    Which of these it is can only be told at the end, so nothing is streamed before.
    """

    def __init__(self, name: str):
        self.name = name
        self.hermes = HermesToolParser()

    def extract(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        if not final:
            return "", []
        content, calls = self.hermes.extract(text, final=True)
        if calls:
            return content, calls
        call = parse_tool_call(text)
        if call is None or call.name != self.name:  # {"name": ...} may just as well be the function's arguments
            call = self._as_arguments(text)
        return ("", [call]) if call is not None else (content, [])

    def _as_arguments(self, text: str) -> ParsedToolCall | None:
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(arguments, dict):
            return None
        return ParsedToolCall(self.name, json.dumps(arguments, ensure_ascii=False))


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


def parse_gemma_call(body: str) -> ParsedToolCall | None:
    """`call:name{arguments}` -> a tool call; None if it is not one."""
    body = body.strip()
    if not body.startswith("call:") or "{" not in body:
        return None
    name, brace, arguments = body[len("call:"):].partition("{")
    if not name.strip() or any(c.isspace() for c in name.strip()):
        return None
    try:
        parsed = parse_gemma_arguments(brace + arguments)
    except ValueError:
        return None
    return ParsedToolCall(name.strip(), json.dumps(parsed, ensure_ascii=False))


class Gemma4ToolParser:
    """`<|tool_call>call:name{arguments}<tool_call|>` blocks become tool calls, their arguments turned into JSON.
    A block that is not a call stays in the content where it was, as do the words around the blocks; an unclosed
    block at the end counts once final. `<|tool_response>` after a call is the model handing over to the tool:
    its turn ends there, so nothing from it on is content."""

    needs_special_tokens = True

    def extract(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        position = 0
        while True:
            start = text.find(GEMMA_CALL_START, position)
            rest = text[position:] if start < 0 else text[position:start]
            if calls and GEMMA_RESPONSE_START in rest:
                content.append(rest[:rest.index(GEMMA_RESPONSE_START)])
                break
            if start < 0:
                if not final:
                    rest = rest[:len(rest) - max(partial_tag_length(rest, tag)
                                                 for tag in (GEMMA_CALL_START, GEMMA_RESPONSE_START))]
                content.append(rest)
                break
            content.append(rest)
            end = text.find(GEMMA_CALL_END, start)
            if end < 0 and not final:
                break  # still being written
            body_end = len(text) if end < 0 else end
            block_end = len(text) if end < 0 else end + len(GEMMA_CALL_END)
            call = parse_gemma_call(text[start + len(GEMMA_CALL_START):body_end])
            if call is None:
                content.append(text[start:block_end])
            else:
                calls.append(call)
            position = block_end
        joined = "".join(content)
        if not final:
            return joined.rstrip(), calls  # trailing whitespace may only separate the text from a tool call
        return (joined if joined.strip() else ""), calls


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser, "gemma4": Gemma4ReasoningParser}
TOOL_CALL_PARSERS = {"hermes": HermesToolParser, "gemma4": Gemma4ToolParser}
