"""The offline API, shaped like vLLM's `LLM`."""
from __future__ import annotations

import itertools

from tqdm.auto import tqdm

from mixquant.config import EngineConfig
from mixquant.engine.llm_engine import LLMEngine
from mixquant.outputs import RequestOutput
from mixquant.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, prefill_model: str | None = None,
                 prefill_precision: str = "auto", decode_precision: str = "bf16", dtype: str = "auto",
                 device: str = "auto", max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, enable_prefix_caching: bool = True,
                 hf_overrides: dict | None = None, seed: int = 0, tensor_parallel_size: int = 1, **kwargs):
        config = EngineConfig(model=model, tokenizer=tokenizer, prefill_model=prefill_model,
                              prefill_precision=prefill_precision, decode_precision=decode_precision, dtype=dtype,
                              device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              enable_prefix_caching=enable_prefix_caching, hf_overrides=hf_overrides, seed=seed,
                              tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            request_id = str(next(self._ids))
            if isinstance(prompt, dict):
                prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
            self.engine.add_request(request_id, prompt, p)
            ids.append(request_id)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(conv, tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **(chat_template_kwargs or {}))
                   for conv in conversations]
        token_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate(token_ids, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="requests", disable=not use_tqdm or len(request_ids) < 2) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in request_ids]
