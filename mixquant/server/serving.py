"""What the chat and completions endpoints share: model names, limits, sampling parameters, submission, SSE."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from mixquant.engine.llm_engine import GENERATION_DEFAULT_KEYS
from mixquant.outputs import RequestOutput
from mixquant.sampling_params import SamplingParams, StructuredOutputsParams
from mixquant.server.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, RequestGroup
from mixquant.server.config import ServerConfig
from mixquant.server.errors import APIError, ClientDisconnected, bad_request, error_body
from mixquant.server.protocol import SamplingRequest, Usage

SSE_DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM sends this floor instead


@dataclass
class ServingContext:
    engine: AsyncEngine
    config: ServerConfig
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; 404 for a name this server does not serve (a missing one means the first)."""
        if requested is None:
            return self.config.served_model_names[0]
        if requested not in self.config.served_model_names:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"{', '.join(self.config.served_model_names)}.", "model")
        return requested

    def check_max_tokens(self, max_tokens: int | None, field: str, prompt_tokens: int) -> int | None:
        """None lets generation run to the end of the context, as vLLM does when max_tokens is left out."""
        if max_tokens is None:
            return None
        if max_tokens < 1:
            raise bad_request(f"{field} must be at least 1, got {max_tokens}", field)
        if prompt_tokens + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the length of the prompt or {field}.", field)
        return max_tokens

    def check_logprobs(self, value: int | None, field: str):
        if value is not None and not 0 <= value <= self.config.max_logprobs:
            raise bad_request(f"{field} must be between 0 and {self.config.max_logprobs} (--max-logprobs), "
                              f"got {value}", field)

    def sampling_params(self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        if request.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        if request.stream and (request.kv_transfer_params or {}).get("do_remote_decode"):
            raise bad_request("kv_transfer_params.do_remote_decode needs stream false: the answer carries what the "
                              "decode instance needs", "stream")
        # generation_config.json's keys are also the request's field names; what the request sets wins
        values = dict(self.config.generation_defaults)
        values.update({name: getattr(request, name) for name in GENERATION_DEFAULT_KEYS
                       if getattr(request, name) is not None})
        try:
            return SamplingParams(
                **values, n=request.n, seed=request.seed, max_tokens=max_tokens, min_tokens=request.min_tokens,
                stop=request.stop, stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens, presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                structured_outputs=structured_outputs, kv_transfer_params=request.kv_transfer_params)
        except ValueError as e:
            # "SamplingParams.top_p must be in (0, 1], got 1.5": the client knows the field without our prefix
            message = str(e).removeprefix("SamplingParams.")
            field = re.match(r"\w+", message)
            raise bad_request(message, field.group(0) if field else None) from e

    async def submit(self, prompts: list[list[int]], params: SamplingParams, prompt_field: str) -> RequestGroup:
        try:
            return await self.engine.submit(prompts, params)
        except ValueError as e:
            raise bad_request(str(e), prompt_field) from e
        except (EngineOverloadedError, EngineDeadError) as e:
            raise APIError(503, str(e)) from e


async def collect_final(request: Request, group: RequestGroup) -> list[RequestOutput]:
    """The final output of each prompt, or ClientDisconnected if the client left first."""
    final: dict[int, RequestOutput] = {}
    with abort_on_disconnect(request, group):
        try:
            async for index, output in group:
                final[index] = output
        except EngineDeadError as e:
            raise APIError(503, str(e)) from e
    if group.aborted:
        raise ClientDisconnected()
    return [final[i] for i in range(len(final))]


def usage_of(outputs: list[RequestOutput]) -> Usage:
    """Prompt tokens once per prompt (not per choice, as vLLM counts), completion tokens over all choices."""
    return Usage.of(sum(len(output.prompt_token_ids) for output in outputs),
                    sum(len(choice.token_ids) for output in outputs for choice in output.outputs))


@contextmanager
def abort_on_disconnect(request: Request, group: RequestGroup) -> Iterator[None]:
    """Aborts the group (freeing its KV blocks) when the client disconnects, or when the handler stops reading."""

    async def wait_for_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.abort()

    watcher = asyncio.create_task(wait_for_disconnect())
    try:
        with group:
            yield
    finally:
        watcher.cancel()


def sse(payload: BaseModel) -> str:
    """One event; fields left unset (None) are left out, as OpenAI's streamed deltas carry only what changed."""
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


def event_stream(events: AsyncIterator[str], done_event: bool = True) -> StreamingResponse:
    """Server-sent events that end with [DONE] (the chat and completions APIs'; the responses API has none); an
    engine failure midway becomes an error event first."""

    async def with_end() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineDeadError as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        if done_event:
            yield SSE_DONE

    return StreamingResponse(with_end(), media_type="text/event-stream")
