"""POST /v1/completions: prompts the client rendered itself (BFCL, lm-eval), with `echo` and legacy logprobs.

lm-eval's loglikelihood requests send `echo: true, logprobs: 1, max_tokens: 1` and read the prompt's token
logprobs back, so with `echo` the prompt's tokens come first in `logprobs`, the first one with a null logprob.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mixquant.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from mixquant.server.async_engine import RequestGroup
from mixquant.server.errors import bad_request
from mixquant.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from mixquant.server.serving import (
    MIN_LOGPROB,
    ServingContext,
    abort_on_disconnect,
    collect_final,
    event_stream,
    sse,
    usage_of,
)
from mixquant.server.structured_outputs import checked, requested_constraint


@dataclass
class CompletionPrompt:
    token_ids: list[int]
    text: str | None  # None for a token-id prompt: decoded only if echoed, once the engine has checked the ids


def completion_prompts(ctx: ServingContext, request: CompletionRequest) -> list[CompletionPrompt]:
    """A string, a list of strings, a list of token ids, or a list of those: one engine request each."""
    prompt = request.prompt
    if not prompt and not isinstance(prompt, str):
        raise bad_request("prompt must not be an empty list", "prompt")
    items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = ctx.tokenizer(item, add_special_tokens=request.add_special_tokens)["input_ids"]
            prompts.append(CompletionPrompt(ids, item))
        else:
            prompts.append(CompletionPrompt(list(item), None))
    return prompts


class LogprobsBuilder:
    """OpenAI's legacy logprobs layout for one choice, built piece by piece so that streamed text offsets run on."""

    def __init__(self):
        self.text_offset = 0

    def add(self, positions: Iterable[tuple[int, PositionLogprobs | None]], tokenizer) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for token_id, entry in positions:
            # the first prompt token has no logprob (nothing precedes it), so its text comes from the tokenizer
            token = entry[token_id].decoded_token if entry else tokenizer.decode([token_id])
            result.tokens.append(token)
            result.text_offset.append(self.text_offset)
            self.text_offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                result.token_logprobs.append(max(entry[token_id].logprob, MIN_LOGPROB))
                result.top_logprobs.append({lp.decoded_token: max(lp.logprob, MIN_LOGPROB) for lp in entry.values()})
        return result


@dataclass
class ChoiceProgress:
    """What a streamed choice has sent so far."""
    chars: int = 0
    tokens: int = 0
    started: bool = False
    finished: bool = False  # a choice that finishes early keeps coming in its request's later outputs
    logprobs: LogprobsBuilder = field(default_factory=LogprobsBuilder)


class CompletionsEndpoint:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def __call__(self, request: CompletionRequest, http_request: Request) -> Response:
        ctx = self.ctx
        model = ctx.model_name(request.model)
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        prompts = completion_prompts(ctx, request)
        if request.kv_transfer_params is not None and len(prompts) > 1:
            raise bad_request("kv_transfer_params go with a single prompt", "prompt")
        ctx.check_logprobs(request.logprobs, "logprobs")
        max_tokens = ctx.check_max_tokens(request.max_tokens, "max_tokens", max(len(p.token_ids) for p in prompts))
        echo_logprobs = request.logprobs if request.echo else None
        structured = await checked(requested_constraint(request))
        params = ctx.sampling_params(request, max_tokens, request.logprobs, prompt_logprobs=echo_logprobs,
                                     structured_outputs=structured)
        group = await ctx.submit([p.token_ids for p in prompts], params, "prompt")
        response_id = f"cmpl-{uuid.uuid4().hex}"
        if request.stream:
            return event_stream(self._stream(request, http_request, group, prompts, response_id, model))
        outputs = await collect_final(http_request, group)
        choices = [self._choice(request, i, prompts[i], output, completion)
                   for i, output in enumerate(outputs) for completion in output.outputs]
        response = CompletionResponse(id=response_id, model=model, choices=choices, usage=usage_of(outputs),
                                      kv_transfer_params=outputs[0].kv_transfer_params)
        return JSONResponse(response.model_dump())

    def _echo_text(self, prompt: CompletionPrompt) -> str:
        return prompt.text if prompt.text is not None else self.ctx.tokenizer.decode(prompt.token_ids)

    def _choice(self, request: CompletionRequest, prompt_index: int, prompt: CompletionPrompt, output: RequestOutput,
                completion: CompletionOutput) -> CompletionChoice:
        text = (self._echo_text(prompt) if request.echo else "") + completion.text
        logprobs = None
        if request.logprobs is not None:
            positions = self._positions(output, completion, 0, echo=request.echo)
            logprobs = LogprobsBuilder().add(positions, self.ctx.tokenizer)
        return CompletionChoice(index=prompt_index * request.n + completion.index, text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)

    @staticmethod
    def _positions(output: RequestOutput, completion: CompletionOutput, start: int,
                   echo: bool) -> list[tuple[int, PositionLogprobs | None]]:
        """(token id, its logprobs) for generated tokens from `start` on, after the prompt's when echoing."""
        # a one-token prompt has nothing to score, and the engine then leaves prompt_logprobs unset
        prompt_logprobs = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
        positions = list(zip(output.prompt_token_ids, prompt_logprobs)) if echo else []
        return positions + list(zip(completion.token_ids[start:], (completion.logprobs or [])[start:]))

    async def _stream(self, request: CompletionRequest, http_request: Request, group: RequestGroup,
                      prompts: list[CompletionPrompt], response_id: str, model: str) -> AsyncIterator[str]:
        created = int(time.time())
        progress: dict[int, ChoiceProgress] = {}
        finals: dict[int, RequestOutput] = {}
        with abort_on_disconnect(http_request, group):
            async for prompt_index, output in group:
                finals[prompt_index] = output
                for completion in output.outputs:
                    index = prompt_index * request.n + completion.index
                    state = progress.setdefault(index, ChoiceProgress())
                    if state.finished:
                        continue
                    text = completion.text[state.chars:]
                    new_tokens = len(completion.token_ids) - state.tokens
                    if not text and not new_tokens and completion.finish_reason is None:
                        continue  # e.g. a prefill step: nothing to tell yet
                    echo = request.echo and not state.started  # the prompt goes out with the first piece
                    logprobs = None
                    if request.logprobs is not None:
                        positions = self._positions(output, completion, state.tokens, echo)
                        logprobs = state.logprobs.add(positions, self.ctx.tokenizer)
                    prefix = self._echo_text(prompts[prompt_index]) if echo else ""
                    choice = CompletionChoice(index=index, text=prefix + text, logprobs=logprobs,
                                              finish_reason=completion.finish_reason,
                                              stop_reason=completion.stop_reason)
                    state.chars, state.tokens, state.started = len(completion.text), len(completion.token_ids), True
                    state.finished = completion.finish_reason is not None
                    yield sse(CompletionResponse(id=response_id, created=created, model=model, choices=[choice]))
        if request.include_usage_in_stream and not group.aborted:
            usage = usage_of([finals[i] for i in range(len(finals))])
            yield sse(CompletionResponse(id=response_id, created=created, model=model, choices=[], usage=usage))
