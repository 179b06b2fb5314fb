"""Request fields -> the StructuredOutputsParams the engine enforces, in one place.

- `response_format` (json_object; json_schema, strict or not), vLLM's `structured_outputs` (json, regex, choice,
  grammar, json_object, structural_tag) and its older `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar`: at most one of them per request.
- Tools, as hermes calls (`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, the format Qwen3's template
  asks for and the hermes parser reads), each a call of an offered function whose arguments match its parameters:
  `tool_choice: "required"` is one or more calls, a named function one call of it, `"auto"` with a response format
  either calls or content in that format (vLLM drops the calls there), and `parallel_tool_calls: false` at most
  one call. `"auto"` alone stays free text, as in vLLM.

Every spec is checked (off the event loop: the first check imports xgrammar) before the request queues, so a bad
one is a 400 naming its field.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace

from mixquant.sampling_params import StructuredOutputsParams
from mixquant.server.errors import bad_request
from mixquant.server.protocol import NamedToolChoice, SamplingRequest, ToolDefinition
from mixquant.structured_output.grammars import build_grammar

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>\n", "\n</tool_call>"


@dataclass(frozen=True)
class Constraint:
    params: StructuredOutputsParams
    field: str  # the request field it came from, named in errors


def requested_constraint(request: SamplingRequest) -> Constraint | None:
    """What the request's format fields ask for; 400 if more than one is given or one is malformed."""
    response_format = request.response_format if request.response_format and request.response_format.type != "text" \
        else None
    given = {field: value for field, value in (
        ("response_format", response_format), ("structured_outputs", request.structured_outputs),
        ("guided_json", request.guided_json), ("guided_regex", request.guided_regex),
        ("guided_choice", request.guided_choice), ("guided_grammar", request.guided_grammar)) if value is not None}
    if len(given) > 1:
        raise bad_request(f"give only one of {', '.join(given)}", list(given)[1])
    if not given:
        return None
    [(field, value)] = given.items()
    if field == "response_format" and value.type == "json_schema":
        field = "response_format.json_schema.schema"
    try:
        return Constraint(_params(field, value), field)
    except ValueError as e:
        raise bad_request(f"{field}: {e}", field) from e


def _params(field: str, value) -> StructuredOutputsParams:
    if field == "response_format":
        return StructuredOutputsParams(json_object=True)
    if field == "response_format.json_schema.schema":
        return StructuredOutputsParams(json=value.json_schema.schema_)
    if field == "structured_outputs":
        return StructuredOutputsParams(**value.model_dump(by_alias=True, exclude_none=True))
    return StructuredOutputsParams(**{field.removeprefix("guided_"): value})


def tool_call_constraint(tools: list[ToolDefinition], tool_choice: str | NamedToolChoice,
                         parallel_tool_calls: bool | None, content: Constraint | None) -> Constraint | None:
    """The constraint of a chat request with tools (`content`: what its format fields ask for)."""
    if tool_choice == "none" or (tool_choice == "auto" and content is None and parallel_tool_calls is not False):
        return content
    single = parallel_tool_calls is False
    if isinstance(tool_choice, NamedToolChoice):
        [tool] = [t for t in tools if t.function.name == tool_choice.function.name]
        structure = calls([tool], single=True)
    elif tool_choice == "required":
        structure = calls(tools, single)
    elif content is not None:  # auto with a format: calls or that format
        structure = {"type": "or", "elements": [calls(tools, single), format_of(content.params)]}
    else:  # auto, one call at most: free text up to a call
        structure = {"type": "triggered_tags", "triggers": [TOOL_CALL_START.strip()], "tags": tool_tags(tools),
                     "at_least_one": False, "stop_after_first": True}
    return Constraint(StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": structure}),
                      "tool_choice")


def tool_tags(tools: list[ToolDefinition]) -> list[dict]:
    return [{"type": "tag", "begin": f'{TOOL_CALL_START}{{"name": {json.dumps(tool.function.name)}, "arguments": ',
             "content": {"type": "json_schema", "json_schema": tool.function.parameters or {"type": "object"}},
             "end": f"}}{TOOL_CALL_END}"} for tool in tools]


def calls(tools: list[ToolDefinition], single: bool) -> dict:
    """One or more hermes calls (one with `single`), one per line, and nothing else."""
    return {"type": "tags_with_separator", "tags": tool_tags(tools), "separator": "\n", "at_least_one": True,
            "stop_after_first": single}


def format_of(params: StructuredOutputsParams) -> dict:
    """A spec as a structural-tag format, to stand beside tool calls."""
    if params.kind == "json":
        return {"type": "json_schema", "json_schema": params.json}
    if params.kind == "json_object":
        return {"type": "json_schema", "json_schema": {"type": "object"}}
    if params.kind == "regex":
        return {"type": "regex", "pattern": params.regex}
    if params.kind == "grammar":
        return {"type": "grammar", "grammar": params.grammar}
    if params.kind == "choice":
        return {"type": "or", "elements": [{"type": "const_string", "value": choice} for choice in params.choice]}
    return params.structural_tag["format"]


async def check_tool_schemas(tools: list[ToolDefinition], tool_choice: str | NamedToolChoice):
    """Each constrained tool's parameters schema, 400 naming that tool's field if it cannot be enforced."""
    for i, tool in enumerate(tools):
        if isinstance(tool_choice, NamedToolChoice) and tool.function.name != tool_choice.function.name:
            continue
        await checked(Constraint(StructuredOutputsParams(json=tool.function.parameters or {"type": "object"}),
                                 f"tools.{i}.function.parameters"))


async def checked(constraint: Constraint | None, reasoning_end: str | None = None) -> StructuredOutputsParams | None:
    """The constraint's params (with the reasoning end set) once its grammar builds; 400 naming its field if not."""
    if constraint is None:
        return None
    try:
        await asyncio.to_thread(build_grammar, constraint.params)
    except ValueError as e:
        raise bad_request(f"{constraint.field}: {e}", constraint.field) from e
    return replace(constraint.params, reasoning_end=reasoning_end)
