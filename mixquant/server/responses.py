"""POST /v1/responses (and GET /v1/responses/{id}): the subset of OpenAI's Responses API agent SDKs use.

A request becomes a chat request (instructions as the system message, the previous response's conversation, then
the input items as messages) and runs through the chat endpoint's preparation: the same template, sampling,
constraints (text.format, tool_choice) and output parser. The parsed output comes back as output items: the
reasoning, the message, the function calls. Responses are stored in memory (the newest `max_stored_responses`,
unless `store: false`) so that `previous_response_id` can continue a conversation.
"""
from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from mixquant.outputs import RequestOutput
from mixquant.server.async_engine import RequestGroup
from mixquant.server.chat import ChatEndpoint, PreparedChat
from mixquant.server.errors import APIError, bad_request, describe_validation_error
from mixquant.server.parsers import ParsedOutput, ParsedToolCall
from mixquant.server.protocol import (
    ChatCompletionRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponsesRequest,
    ResponsesUsage,
    TextConfig,
    parts_text,
)
from mixquant.server.serving import ServingContext, abort_on_disconnect, collect_final, event_stream


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class StoredResponse:
    response: ResponseObject
    messages: list[dict]  # the conversation up to and including this response, as chat messages (no instructions)


class ResponseStore:
    """The newest `capacity` stored responses, the oldest evicted first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse):
        self.responses[stored.response.id] = stored
        while len(self.responses) > self.capacity:
            self.responses.popitem(last=False)

    def get(self, response_id: str, param: str, status: int) -> StoredResponse:
        stored = self.responses.get(response_id)
        if stored is None:
            raise APIError(status, f"no stored response with id {response_id!r} (it was made with store: false, "
                                   f"never existed, or was evicted: this server keeps the newest {self.capacity})",
                           param)
        return stored


def input_messages(items: str | list) -> list[dict]:
    """Input items as chat messages: a function call joins the assistant turn it follows, a reasoning item goes with
    the assistant turn after it, a function call's output becomes a tool message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning = None
    for i, item in enumerate(items):
        if isinstance(item, ReasoningItem):
            reasoning = item.text
            continue
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if reasoning is None and messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif isinstance(item, FunctionCallOutputItem):
            message = {"role": "tool", "tool_call_id": item.call_id, "content": parts_text(item.output)}
        else:
            message = {"role": item.role, "content": parts_text(item.content)}
        if reasoning is not None:
            if message["role"] != "assistant":
                raise bad_request("a reasoning item must come right before the assistant message or function call "
                                  "it led to", f"input.{i}")
            message["reasoning_content"], reasoning = reasoning, None
        messages.append(message)
    if reasoning is not None:
        raise bad_request("a reasoning item must come right before the assistant message or function call it led to",
                          "input")
    return messages


def output_message(items: list[OutputItem]) -> dict:
    """A response's output as the assistant message that continues its conversation."""
    message: dict = {"role": "assistant", "content": None}
    for item in items:
        if isinstance(item, OutputReasoning):
            message["reasoning_content"] = "".join(part.text for part in item.content)
        elif isinstance(item, OutputMessage):
            message["content"] = (message["content"] or "") + "".join(part.text for part in item.content)
        else:
            message.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
    return message


# the chat request's fields that a responses request names otherwise, longest first
CHAT_FIELDS = {"response_format.json_schema.schema": "text.format.schema", "response_format": "text.format",
               "max_completion_tokens": "max_output_tokens"}


def in_responses_terms(error: APIError) -> APIError:
    """An error about the chat request a responses request became, with the responses request's field names."""
    message, param = error.message, error.param
    for chat_field, field_name in CHAT_FIELDS.items():
        message = message.replace(chat_field, field_name)
        if param is not None and param.startswith(chat_field):
            param = field_name + param[len(chat_field):]
    return APIError(error.status, message, param)


def chat_request(request: ResponsesRequest, history: list[dict], messages: list[dict]) -> ChatCompletionRequest:
    """The chat request a responses request amounts to."""
    tool_choice = request.tool_choice
    if isinstance(tool_choice, FunctionToolChoice):
        tool_choice = {"type": "function", "function": {"name": tool_choice.name}}
    text_format = request.text.format if request.text is not None else None
    response_format = None
    if text_format is not None and text_format.type != "text":
        response_format = {"type": text_format.type}
        if text_format.type == "json_schema":
            response_format["json_schema"] = {"name": text_format.name, "schema": text_format.schema_,
                                              "strict": text_format.strict}
    system = [{"role": "system", "content": request.instructions}] if request.instructions is not None else []
    body = {
        "model": request.model, "messages": system + history + messages,
        "tools": [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                  for tool in request.tools] or None,
        "tool_choice": tool_choice, "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": response_format, "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed,
        "chat_template_kwargs": request.chat_template_kwargs,
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        message, param = describe_validation_error(e.errors()[0])
        raise bad_request(f"the input does not make a valid conversation: {message}", param) from e


@dataclass
class OutputBuilder:
    """The output items of a response in the order they were opened, grown from successive parses of the output;
    each growth is also told as streaming events."""
    items: list[OutputItem] = field(default_factory=list)
    reasoning: OutputReasoning | None = None
    message: OutputMessage | None = None
    num_calls: int = 0

    def update(self, before: ParsedOutput, after: ParsedOutput) -> list[dict]:
        events = []
        if len(after.reasoning) > len(before.reasoning):
            events += self._grow_reasoning(after.reasoning[len(before.reasoning):])
        if len(after.content) > len(before.content):
            events += self._close_reasoning()
            events += self._grow_message(after.content[len(before.content):])
        for call in after.tool_calls[self.num_calls:]:
            events += self._close_reasoning() + self._close_message()
            events += self._add_call(call)
        return events

    def finish(self, status: str) -> list[dict]:
        events = self._close_reasoning() + self._close_message()
        for item in self.items:
            item.status = status
        return events

    def _index(self, item: OutputItem) -> int:
        return next(i for i, other in enumerate(self.items) if other is item)

    def _grow_reasoning(self, delta: str) -> list[dict]:
        events = []
        if self.reasoning is None:
            self.reasoning = OutputReasoning(id=new_id("rs"), content=[ReasoningText(text="")], status="in_progress")
            self.items.append(self.reasoning)
            events += self._opened(self.reasoning, {"type": "reasoning_text", "text": ""})
        self.reasoning.content[0].text += delta
        return events + [{"type": "response.reasoning_text.delta", "item_id": self.reasoning.id,
                          "output_index": self._index(self.reasoning), "content_index": 0, "delta": delta}]

    def _grow_message(self, delta: str) -> list[dict]:
        events = []
        if self.message is None:
            self.message = OutputMessage(id=new_id("msg"), content=[OutputText(text="")], status="in_progress")
            self.items.append(self.message)
            events += self._opened(self.message, {"type": "output_text", "text": "", "annotations": []})
        self.message.content[0].text += delta
        return events + [{"type": "response.output_text.delta", "item_id": self.message.id,
                          "output_index": self._index(self.message), "content_index": 0, "delta": delta,
                          "logprobs": []}]

    def _add_call(self, call: ParsedToolCall) -> list[dict]:
        item = OutputFunctionCall(id=new_id("fc"), call_id=new_id("call"), name=call.name, arguments="",
                                  status="in_progress")
        self.items.append(item)
        self.num_calls += 1
        index = self._index(item)
        added = {"type": "response.output_item.added", "output_index": index, "item": item.model_dump()}
        item.arguments, item.status = call.arguments, "completed"
        return [added,
                {"type": "response.function_call_arguments.delta", "item_id": item.id, "output_index": index,
                 "delta": call.arguments},
                {"type": "response.function_call_arguments.done", "item_id": item.id, "output_index": index,
                 "name": call.name, "arguments": call.arguments},
                {"type": "response.output_item.done", "output_index": index, "item": item.model_dump()}]

    def _opened(self, item: OutputItem, part: dict) -> list[dict]:
        index = self._index(item)
        shown = item.model_copy(update={"content": []})
        return [{"type": "response.output_item.added", "output_index": index, "item": shown.model_dump()},
                {"type": "response.content_part.added", "item_id": item.id, "output_index": index,
                 "content_index": 0, "part": part}]

    def _close_reasoning(self) -> list[dict]:
        item, self.reasoning = self.reasoning, None
        if item is None:
            return []
        text = item.content[0].text
        return self._closed(item, {"type": "response.reasoning_text.done", "text": text}, ReasoningText(text=text))

    def _close_message(self) -> list[dict]:
        item, self.message = self.message, None
        if item is None:
            return []
        text = item.content[0].text
        return self._closed(item, {"type": "response.output_text.done", "text": text, "logprobs": []},
                            OutputText(text=text))

    def _closed(self, item: OutputItem, done: dict, part) -> list[dict]:
        index = self._index(item)
        item.status = "completed"
        where = {"item_id": item.id, "output_index": index, "content_index": 0}
        return [done | where,
                {"type": "response.content_part.done", **where, "part": part.model_dump()},
                {"type": "response.output_item.done", "output_index": index, "item": item.model_dump()}]


class ResponsesEndpoint:
    def __init__(self, ctx: ServingContext, chat: ChatEndpoint, store: ResponseStore):
        self.ctx = ctx
        self.chat = chat
        self.store = store

    async def create(self, request: ResponsesRequest, http_request: Request) -> Response:
        history = []
        if request.previous_response_id is not None:
            history = self.store.get(request.previous_response_id, "previous_response_id", 400).messages
        messages = input_messages(request.input)
        try:
            chat = await self.chat.prepare(chat_request(request, history, messages))
        except APIError as e:
            raise in_responses_terms(e) from e
        group = await self.ctx.submit([chat.token_ids], chat.params, "input")
        response = ResponseObject(
            id=new_id("resp"), created_at=int(time.time()), status="in_progress", model=chat.model,
            instructions=request.instructions, tools=request.tools, tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=request.parallel_tool_calls, text=request.text or TextConfig(format={"type": "text"}),
            max_output_tokens=request.max_output_tokens, temperature=request.temperature, top_p=request.top_p,
            previous_response_id=request.previous_response_id, store=request.store, metadata=request.metadata)
        conversation = history + messages
        if request.stream:
            return event_stream(self._stream(http_request, group, chat, response, conversation), done_event=False)
        [output] = await collect_final(http_request, group)
        builder = OutputBuilder()
        builder.update(ParsedOutput(), chat.parser.parse(output.outputs[0].text, final=True))
        self._complete(response, builder, output, conversation)
        return JSONResponse(response.model_dump(by_alias=True))

    def retrieve(self, response_id: str) -> Response:
        return JSONResponse(self.store.get(response_id, "response_id", 404).response.model_dump(by_alias=True))

    def _complete(self, response: ResponseObject, builder: OutputBuilder, output: RequestOutput,
                  conversation: list[dict]) -> list[dict]:
        """Fills in the finished response (and stores it); returns the events that close its items."""
        completion = output.outputs[0]
        incomplete = completion.finish_reason == "length"
        response.status = "incomplete" if incomplete else "completed"
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens") if incomplete else None
        events = builder.finish(response.status)
        response.output = builder.items
        reasoning = "".join(part.text for item in builder.items if isinstance(item, OutputReasoning)
                            for part in item.content)
        prompt_tokens, output_tokens = len(output.prompt_token_ids), len(completion.token_ids)
        response.usage = ResponsesUsage(
            input_tokens=prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens),
            output_tokens=output_tokens, total_tokens=prompt_tokens + output_tokens,
            output_tokens_details=OutputTokensDetails(
                reasoning_tokens=len(self.ctx.tokenizer(reasoning, add_special_tokens=False)["input_ids"])
                if reasoning else 0))
        if response.store:
            self.store.put(StoredResponse(response, conversation + [output_message(builder.items)]))
        return events

    async def _stream(self, http_request: Request, group: RequestGroup, chat: PreparedChat, response: ResponseObject,
                      conversation: list[dict]) -> AsyncIterator[str]:
        numbers = itertools.count()

        def event(payload: dict) -> str:
            payload = {**payload, "sequence_number": next(numbers)}
            return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"

        yield event({"type": "response.created", "response": response.model_dump(by_alias=True)})
        yield event({"type": "response.in_progress", "response": response.model_dump(by_alias=True)})
        builder, sent, final = OutputBuilder(), ParsedOutput(), None
        with abort_on_disconnect(http_request, group):
            async for _, output in group:
                final = output
                parsed = chat.parser.parse(output.outputs[0].text, final=output.finished)
                for payload in builder.update(sent, parsed):
                    yield event(payload)
                sent = parsed
        if group.aborted:
            return
        for payload in self._complete(response, builder, final, conversation):
            yield event(payload)
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        yield event({"type": kind, "response": response.model_dump(by_alias=True)})
