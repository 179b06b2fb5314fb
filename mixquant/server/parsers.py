"""Generated text -> reasoning, content and tool calls (vLLM's `--reasoning-parser qwen3`, `--tool-call-parser hermes`).

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


# ---- both ----------------------------------------------------------------------------------------------------------

class ChatOutputParser:
    """Reasoning first; tool calls are looked for in the content only, never inside the reasoning."""

    def __init__(self, reasoning: Qwen3ReasoningParser | None = None, tools: ToolParser | None = None):
        self.reasoning = reasoning
        self.tools = tools

    def parse(self, text: str, final: bool) -> ParsedOutput:
        reasoning, content = self.reasoning.split(text, final) if self.reasoning else ("", text)
        calls: list[ParsedToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.extract(content, final)
        return ParsedOutput(reasoning, content, calls)


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser}
TOOL_CALL_PARSERS = {"hermes": HermesToolParser}
