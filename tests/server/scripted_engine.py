"""A stand-in for LLMEngine that 'generates' a scripted text, for server behaviour random weights cannot show.

A tiny model with random weights never writes a tool call or closes a think block, so the end-to-end tests of
tool-call and reasoning output (streamed through HTTP to the openai client) run on this instead. It speaks the
engine's interface: add_request / step / abort_request, cumulative RequestOutputs, one token per step.
"""
from __future__ import annotations

from dataclasses import dataclass

from mixquant.outputs import CompletionOutput, RequestOutput
from mixquant.sampling_params import SamplingParams


@dataclass
class ScriptedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    script_ids: list[int]
    produced: int = 0


class ScriptedPrecisions:
    @staticmethod
    def describe_precisions() -> dict[str, str | None]:
        return {"prefill_precision": "bf16", "decode_precision": "bf16", "prefill_kernels": "native",
                "decode_kernels": "native", "nvfp4": None}


class ScriptedEngine:
    def __init__(self, tokenizer, max_model_len: int = 1024):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.config = ScriptedPrecisions()
        self.script = ""  # what every request added from now on generates
        self.failure = None  # it never loses a rank
        self.requests: dict[str, ScriptedRequest] = {}

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams):
        script_ids = self.tokenizer(self.script, add_special_tokens=False)["input_ids"]
        self.requests[request_id] = ScriptedRequest(list(prompt), params, script_ids)

    def abort_request(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for request_id, request in list(self.requests.items()):
            request.produced += 1
            ids = request.script_ids[:request.produced]
            reason = None
            if request.produced == len(request.script_ids):
                reason = "stop"  # as if the model ended with its EOS token
            elif request.params.max_tokens is not None and request.produced >= request.params.max_tokens:
                reason = "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=request.params.skip_special_tokens)
            completions = [CompletionOutput(i, text, ids, finish_reason=reason)
                           for i in range(request.params.n)]
            outputs.append(RequestOutput(request_id, None, request.prompt_token_ids, completions, reason is not None))
            if reason is not None:
                del self.requests[request_id]
        return outputs

    def stats(self) -> dict:
        return {"num_requests_running": len(self.requests), "num_requests_waiting": 0, "kv_cache_usage": 0.0,
                "prompt_tokens": 0, "generation_tokens": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                "num_preemptions": 0, "tokens_computed": {}}
