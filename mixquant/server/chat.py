"""POST /v1/chat/completions: the chat template, tools, reasoning and tool-call parsing, chat-style logprobs."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mixquant.outputs import CompletionOutput
from mixquant.sampling_params import SamplingParams
from mixquant.server.async_engine import RequestGroup
from mixquant.server.errors import bad_request
from mixquant.server.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS, ChatOutputParser, ParsedOutput
from mixquant.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    TokenLogprob,
    ToolDefinition,
    ToolMessage,
    TopLogprob,
    content_text,
)
from mixquant.server.serving import (
    MIN_LOGPROB,
    ServingContext,
    abort_on_disconnect,
    collect_final,
    event_stream,
    sse,
    usage_of,
)
from mixquant.server.structured_outputs import check_tool_schemas, checked, requested_constraint, tool_call_constraint

ToolChoice = str | NamedToolChoice  # "none" | "auto" | "required" | one named function


def template_message(message: ChatMessage, index: int) -> dict:
    """A message as chat templates expect it: plain-text content, tool-call arguments as objects (as vLLM passes
    them, so templates may `tojson` them), reasoning under `reasoning_content`."""
    rendered = {"role": "system" if message.role == "developer" else message.role,
                "content": content_text(message.content)}
    if message.name is not None:
        rendered["name"] = message.name
    if isinstance(message, ToolMessage):
        rendered["tool_call_id"] = message.tool_call_id
    if isinstance(message, AssistantMessage):
        reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if reasoning is not None:
            rendered["reasoning_content"] = reasoning
        if message.tool_calls:
            rendered["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name,
                              "arguments": _arguments(call.function.arguments, f"messages.{index}.tool_calls.{k}")}}
                for k, call in enumerate(message.tool_calls)]
    return rendered


def _arguments(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"{where}.function.arguments is not valid JSON ({e})", f"{where}.function.arguments") from e


def render_chat(ctx: ServingContext, messages: list[ChatMessage], tools: list[ToolDefinition] | None,
                template_kwargs: dict, add_generation_prompt: bool) -> str:
    conversation = [template_message(message, i) for i, message in enumerate(messages)]
    tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools] if tools else None
    try:
        return ctx.tokenizer.apply_chat_template(conversation, tools=tool_dicts, chat_template=ctx.config.chat_template,
                                                 tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **template_kwargs)
    except Exception as e:  # the template's own checks (raise_exception) and what it cannot handle alike
        raise bad_request(f"the chat template could not render these messages: {type(e).__name__}: {e}",
                          "messages") from e


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def response_message(parsed: ParsedOutput) -> ResponseMessage:
    """Content is null when the answer is all reasoning or tool calls (as vLLM sends it), "" only if nothing came."""
    reasoning = parsed.reasoning or None
    content = parsed.content or (None if reasoning or parsed.tool_calls else "")
    calls = [ResponseToolCall(id=new_tool_call_id(), function=ResponseFunctionCall(name=call.name,
                                                                                   arguments=call.arguments))
             for call in parsed.tool_calls]
    return ResponseMessage(content=content, reasoning=reasoning, reasoning_content=reasoning, tool_calls=calls)


def message_delta(before: ParsedOutput, after: ParsedOutput) -> DeltaMessage | None:
    """What `after` adds to `before` (the parsers guarantee it only extends it); None if nothing."""
    reasoning = after.reasoning[len(before.reasoning):]
    content = after.content[len(before.content):]
    calls = [DeltaToolCall(index=k, id=new_tool_call_id(), type="function",
                           function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
             for k, call in enumerate(after.tool_calls) if k >= len(before.tool_calls)]
    if not (reasoning or content or calls):
        return None
    return DeltaMessage(content=content or None, reasoning=reasoning or None, reasoning_content=reasoning or None,
                        tool_calls=calls or None)


def chat_logprobs(completion: CompletionOutput, start: int, num_top: int) -> ChatLogprobs:
    """Chat-style logprobs of the tokens from `start` on: each chosen token with its `num_top` most likely."""
    entries = []
    for token_id, position in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
        chosen = position[token_id]
        top = sorted((lp for lp in position.values() if lp.rank <= num_top), key=lambda lp: lp.rank)[:num_top]
        entries.append(TokenLogprob(
            token=chosen.decoded_token, logprob=max(chosen.logprob, MIN_LOGPROB),
            bytes=list(chosen.decoded_token.encode()),
            top_logprobs=[TopLogprob(token=lp.decoded_token, logprob=max(lp.logprob, MIN_LOGPROB),
                                     bytes=list(lp.decoded_token.encode())) for lp in top]))
    return ChatLogprobs(content=entries)


@dataclass
class PreparedChat:
    """A chat request made ready for the engine: what the chat and responses endpoints share."""
    model: str
    token_ids: list[int]
    params: SamplingParams
    parser: ChatOutputParser
    tool_choice: ToolChoice
    num_top_logprobs: int | None


class ChatEndpoint:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def __call__(self, request: ChatCompletionRequest, http_request: Request) -> Response:
        chat = await self.prepare(request)
        group = await self.ctx.submit([chat.token_ids], chat.params, "messages")
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            return event_stream(self._stream(request, http_request, group, chat, response_id))
        [output] = await collect_final(http_request, group)
        choices = []
        for completion in output.outputs:
            parsed = chat.parser.parse(completion.text, final=True)
            choices.append(ChatChoice(
                index=completion.index, message=response_message(parsed),
                logprobs=chat_logprobs(completion, 0, chat.num_top_logprobs)
                if chat.num_top_logprobs is not None else None,
                finish_reason=self._finish_reason(chat.tool_choice, parsed, completion),
                stop_reason=completion.stop_reason))
        response = ChatCompletionResponse(id=response_id, model=chat.model, choices=choices,
                                          usage=usage_of([output]), kv_transfer_params=output.kv_transfer_params)
        return JSONResponse(response.model_dump())

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Checks the request, renders and tokenizes the prompt, builds its sampling parameters and output parser."""
        ctx = self.ctx
        model = ctx.model_name(request.model)
        tool_choice = self._tool_choice(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        ctx.check_logprobs(request.top_logprobs, "top_logprobs")
        template_kwargs = {**ctx.config.default_chat_template_kwargs, **(request.chat_template_kwargs or {})}
        prompt = render_chat(ctx, request.messages, request.tools, template_kwargs, request.add_generation_prompt)
        token_ids = ctx.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if request.max_completion_tokens is not None:
            max_tokens = ctx.check_max_tokens(request.max_completion_tokens, "max_completion_tokens", len(token_ids))
        else:
            max_tokens = ctx.check_max_tokens(request.max_tokens, "max_tokens", len(token_ids))
        num_top = (request.top_logprobs or 0) if request.logprobs else None
        constraint = requested_constraint(request)
        calls_constrained = False
        if request.tools:
            tools_constraint = tool_call_constraint(request.tools, tool_choice, request.parallel_tool_calls,
                                                    constraint)
            calls_constrained = tools_constraint is not constraint
            if calls_constrained:
                await check_tool_schemas(request.tools, tool_choice)
            constraint = tools_constraint
        parser = self._output_parser(tool_choice, template_kwargs, request.tools, calls_constrained)
        # the constraint starts where the reasoning parser starts reading content
        thinking = parser.reasoning is not None and parser.reasoning.thinking_enabled
        structured = await checked(constraint, parser.reasoning.end if thinking else None)
        params = ctx.sampling_params(request, max_tokens, num_top, structured_outputs=structured)
        if parser.needs_special_tokens:
            params.skip_special_tokens = False  # the parser reads the model's markers, which are special tokens
        return PreparedChat(model, token_ids, params, parser, tool_choice, num_top)

    def _tool_choice(self, request: ChatCompletionRequest) -> ToolChoice:
        choice = request.tool_choice or ("auto" if request.tools else "none")
        if choice == "none":
            return choice
        if not request.tools:
            raise bad_request("tool_choice is set but no tools were given", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in request.tools]
            if choice.function.name not in names:
                raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among the "
                                  f"tools ({', '.join(names)})", "tool_choice")
        elif choice == "auto" and not self.ctx.config.enable_auto_tool_choice:
            raise bad_request('"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                              "--tool-call-parser", "tool_choice")
        return choice

    def _output_parser(self, tool_choice: ToolChoice, template_kwargs: dict,
                       request_tools: list[ToolDefinition] | None, calls_constrained: bool) -> ChatOutputParser:
        config = self.ctx.config
        reasoning = None
        if config.reasoning_parser is not None:
            reasoning = REASONING_PARSERS[config.reasoning_parser](
                thinking_enabled=template_kwargs.get("enable_thinking", True) is not False)
        tools = None
        if tool_choice != "none":
            # calls a grammar constrains are hermes calls of the offered tools, whatever --tool-call-parser says
            # (and `required` or a named function needs no parser flag, as in vLLM)
            name = "hermes" if calls_constrained else config.tool_call_parser or "hermes"
            tools = TOOL_CALL_PARSERS[name](request_tools)
        return ChatOutputParser(reasoning, tools)

    @staticmethod
    def _finish_reason(tool_choice: ToolChoice, parsed: ParsedOutput, completion: CompletionOutput) -> str | None:
        # As in vLLM: a call to a named function finishes with the engine's reason, parsed calls otherwise with
        # "tool_calls".
        if parsed.tool_calls and not isinstance(tool_choice, NamedToolChoice):
            return "tool_calls"
        return completion.finish_reason

    async def _stream(self, request: ChatCompletionRequest, http_request: Request, group: RequestGroup,
                      chat: PreparedChat, response_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        num_top = chat.num_top_logprobs

        def chunk(choices: list[ChatStreamChoice], usage=None) -> str:
            return sse(ChatCompletionChunk(id=response_id, created=created, model=chat.model, choices=choices,
                                           usage=usage))

        for index in range(request.n):
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        sent = [ParsedOutput() for _ in range(request.n)]
        tokens_sent = [0] * request.n
        done = [False] * request.n  # choices that finish early keep coming in the request's later outputs
        final = None
        with abort_on_disconnect(http_request, group):
            async for _, output in group:
                final = output
                for completion in output.outputs:
                    index = completion.index
                    if done[index]:
                        continue
                    done[index] = completion.finish_reason is not None
                    parsed = chat.parser.parse(completion.text, final=done[index])
                    delta = message_delta(sent[index], parsed)
                    new_tokens = len(completion.token_ids) > tokens_sent[index]
                    if delta is None and not done[index] and not (num_top is not None and new_tokens):
                        continue
                    logprobs = chat_logprobs(completion, tokens_sent[index], num_top) if num_top is not None else None
                    finish_reason = self._finish_reason(chat.tool_choice, parsed, completion) if done[index] else None
                    yield chunk([ChatStreamChoice(index=index, delta=delta or DeltaMessage(), logprobs=logprobs,
                                                  finish_reason=finish_reason, stop_reason=completion.stop_reason)])
                    sent[index], tokens_sent[index] = parsed, len(completion.token_ids)
        if request.include_usage_in_stream and not group.aborted:
            yield chunk([], usage_of([final]))
