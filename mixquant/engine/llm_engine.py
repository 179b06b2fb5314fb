"""The engine loop: requests in, one scheduled forward pass per step, outputs (cumulative, vLLM-style) out.

Not thread-safe: a server drives it from one thread.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from mixquant.config import EngineConfig, phase_boundary, resolve_dtype
from mixquant.distributed.executor import MultiprocExecutor
from mixquant.distributed.kv_transfer import RemotePrefill, prompt_digest
from mixquant.distributed.nixl_connector import NixlConnector
from mixquant.distributed.parallel_state import check_no_tensor_parallel_engine
from mixquant.engine.block_manager import BlockManager
from mixquant.engine.model_runner import ModelRunner
from mixquant.engine.scheduler import ScheduledBatch, Scheduler
from mixquant.engine.sequence import Sequence, SequenceStatus
from mixquant.engine.state_slots import StateSlots
from mixquant.layers.sampler import sample
from mixquant.models.registry import model_class
from mixquant.outputs import CompletionOutput, Logprob, RequestOutput
from mixquant.sampling_params import SamplingParams
from mixquant.structured_output import StructuredOutputManager
from mixquant.utils.hf import load_config, resolve_model_path

logger = logging.getLogger(__name__)

GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# How long a step with nothing to run waits for a compiling grammar before it returns (to take new commands).
GRAMMAR_WAIT_S = 0.01


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    grammar: Future | None = None  # the compiling structured-output grammar
    reasoning_end_id: int | None = None
    kv_transfer_params: dict | None = None  # a prefill instance's answer: where a decode instance reads the KV


class LLMEngine:
    def __init__(self, config: EngineConfig):
        check_no_tensor_parallel_engine()
        self.config = config
        self.model_path = resolve_model_path(config.checkpoint, config.revision)
        self.hf_config = load_config(self.model_path, config.hf_overrides)
        self.dtype = resolve_dtype(config.dtype, getattr(self.hf_config, "dtype", None), config.device_obj)
        self.max_model_len = self._max_model_len()
        self.tokenizer = None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            str(resolve_model_path(config.tokenizer, config.revision)) if config.tokenizer else str(self.model_path))
        self.generation_defaults, self.eos_token_ids = self._generation_config()
        if config.tensor_parallel_size == 1:
            self.runner = ModelRunner(config, self.hf_config, self.dtype, self.max_model_len)
        else:  # the same interface, over one process per rank
            self._check_tensor_parallel()
            self.runner = MultiprocExecutor(config, self.hf_config, self.dtype, self.max_model_len)
        self._check_kv_capacity()
        self.structured_output = None if self.tokenizer is None else StructuredOutputManager(
            self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids, config.device_obj)
        self._reset_state()
        self.kv_connector: NixlConnector | None = None
        if config.device_obj.type == "cuda":
            self.warm_up()
        if config.kv_transfer_config is not None:
            self._check_kv_transfer()
            self.kv_connector = NixlConnector(config.kv_transfer_config, self.runner.kv_block_planes(),
                                              self.runner.kv_cache_tensors(), config.block_size, self.block_manager,
                                              config.prefill_precision)

    def _reset_state(self):
        """No requests, an empty KV cache and prefix cache, counters at zero."""
        config = self.config
        state_slots = None
        if self.model_runner.state_pool is not None:
            state_slots = StateSlots(self.model_runner.state_pool, config.block_size, config.state_snapshot_interval)
        layout = self.model_runner.kv_layout
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                          config.prefill_precision, config.decode_precision, state_slots,
                                          layout.window, layout.window_units)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.waiting_for_grammar: dict[str, Request] = {}  # kept from the scheduler until their grammar compiled
        self.default_generator = torch.Generator(device=config.device_obj).manual_seed(config.seed)
        self.tokens_computed: Counter[tuple[str, str]] = Counter()  # (phase, precision) -> tokens
        self.num_prompt_tokens = self.num_generation_tokens = 0

    def warm_up(self):
        """Runs the kinds of step serving meets (a full-budget prefill, a short one, a prefill beside decodes,
        decodes) on dummy prompts, so that kernel compilation (torch.compile's fused kernels, Triton's JIT) is
        paid here and not by the first requests; then leaves no trace of them."""
        capacity = self.kv_cache_tokens()
        long_len = max(2, min(self.config.max_num_batched_tokens, self.max_model_len, capacity) - 8)
        # a prefill-only engine has no decode weights: its warm-up computes prompts only, as its requests do
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                kv_transfer_params={"do_remote_decode": True} if self.config.prefill_only else None)
        vocab = self.hf_config.vocab_size
        self.add_request("warm-up-short", [i % vocab for i in range(min(8, long_len))], params)
        self.step()
        self.add_request("warm-up-long", [(7 * i + 3) % vocab for i in range(long_len)], params)
        while self.has_unfinished_requests():
            self.step()
        if self.structured_output is not None:
            self.structured_output.warm_up()
        self._reset_state()

    @property
    def model_runner(self) -> ModelRunner:
        """This process's ModelRunner, for inspection (its model, graphs, KV layout): rank 0's under tensor
        parallelism, where steps go through self.runner, which runs them on every rank."""
        return self.runner if self.config.tensor_parallel_size == 1 else self.runner.worker.runner

    def close(self):
        """Stops the ranks of a tensor-parallel engine (a collected engine stops them too); nothing at size 1."""
        if self.config.tensor_parallel_size > 1:
            self.runner.shutdown()

    @property
    def failure(self) -> Exception | None:
        """Why this engine cannot run any more (a tensor-parallel rank died), or None."""
        return self.runner.failure if self.config.tensor_parallel_size > 1 else None

    def _max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit} (stretch it with a rope_scaling hf_override)")
        return self.config.max_model_len

    def _check_tensor_parallel(self):
        """What cannot run split over ranks yet is refused before any rank starts."""
        cls = model_class(self.hf_config)
        if not cls.tensor_parallel:
            raise ValueError(f"tensor_parallel_size={self.config.tensor_parallel_size}: {cls.__name__}'s layers are not "
                             "split over ranks yet (docs/distributed.md); run it with tensor_parallel_size=1")
        if self.config.kv_transfer_config is not None:
            raise ValueError("a disaggregated instance (--kv-transfer-config) runs with tensor_parallel_size=1 for now "
                             "(tp_size 1 in kv_transfer_params)")

    def _check_kv_capacity(self):
        """One sequence may grow to max_model_len tokens: a cache that cannot hold them would preempt that sequence
        to let it grow, over and over (vLLM refuses such a configuration at start-up too)."""
        capacity = self.kv_cache_tokens()
        if capacity < self.max_model_len:
            raise ValueError(f"the KV cache holds {capacity} tokens, fewer than max_model_len={self.max_model_len} "
                             "that one sequence may reach: lower max_model_len, or give the KV cache more memory "
                             "(gpu_memory_utilization, kv_cache_memory_bytes, num_kv_blocks)")

    def _generation_config(self) -> tuple[dict, set[int]]:
        eos = set()
        defaults = {}
        path = self.model_path / "generation_config.json"
        if path.is_file():
            gen = json.loads(path.read_text())
            ids = gen.get("eos_token_id")
            eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
            defaults = {k: gen[k] for k in GENERATION_DEFAULT_KEYS if k in gen}
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        return defaults, eos

    # ---- requests -----------------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine was started with skip_tokenizer_init: pass prompts as token ids")
        return self.tokenizer(prompt)["input_ids"]

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None):
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine was started with skip_tokenizer_init")
        text, token_ids = (prompt, self.tokenize(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        self._validate_prompt(token_ids)
        remote_decode, remote_prefill = self._kv_transfer_request(request_id, params, token_ids)
        # a prefill instance samples nothing: the decode instance that reads its KV enforces the grammar
        grammar, reasoning_end_id = (None, None) if remote_decode else self._compile_grammar(params)
        seqs = []
        for index in range(1 if remote_decode else params.n):  # a prefill instance computes the prompt once
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.config.device_obj).manual_seed(params.seed + index)
            seq = Sequence(request_id, index, list(token_ids), params, generator, remote_decode=remote_decode,
                           remote_prefill=remote_prefill)
            if remote_prefill is not None:  # its blocks enter the prefix cache under the precision that wrote them
                seq.num_imported_tokens = remote_prefill.num_tokens
                seq.imported_kv_precision = remote_prefill.kv_precision
            seqs.append(seq)
        request = Request(request_id, text, token_ids, params, seqs, time.monotonic(), grammar, reasoning_end_id)
        self.requests[request_id] = request
        if grammar is not None:
            self.waiting_for_grammar[request_id] = request
            return
        for seq in seqs:
            self.scheduler.add(seq)

    def _compile_grammar(self, params: SamplingParams) -> tuple[Future | None, int | None]:
        """The request's grammar, compiling (ValueError now for a spec that is invalid or cannot be enforced)."""
        spec = params.structured_outputs
        if spec is None:
            return None, None
        if self.structured_output is None:
            raise ValueError("structured outputs need a tokenizer; this engine was started with skip_tokenizer_init")
        end_id = self.structured_output.reasoning_end_id(spec.reasoning_end) if spec.reasoning_end else None
        return self.structured_output.compile(spec), end_id

    def _admit_compiled(self) -> list[str]:
        """Hands requests whose grammar has compiled to the scheduler; returns those whose compile failed (they
        finish as aborted: their spec was checked when they came, so this is the grammar library failing)."""
        failed = []
        for request_id, request in list(self.waiting_for_grammar.items()):
            if not request.grammar.done():
                continue
            del self.waiting_for_grammar[request_id]
            if request.grammar.exception() is not None:
                logger.error("request %s: its grammar failed to compile: %s", request_id, request.grammar.exception())
                for seq in request.seqs:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)
                failed.append(request_id)
                continue
            for seq in request.seqs:
                seq.grammar = self.structured_output.new_sequence_grammar(request.grammar.result(),
                                                                          request.reasoning_end_id)
                self.scheduler.add(seq)
        return failed

    def _validate_prompt(self, token_ids: list[int]):
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.hf_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, which leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        needed = self.block_manager.peak_units(len(token_ids) + 1, self.config.max_num_batched_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, whose KV takes {needed} blocks of "
                             f"{self.config.block_size} tokens, but the KV cache holds only "
                             f"{self.block_manager.num_blocks}")

    def abort_request(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.waiting_for_grammar.pop(request_id, None)
        for seq in request.seqs:
            if not seq.is_finished:
                if seq.remote_prefill is not None:
                    self.kv_connector.abandon(seq)
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests, or KV transfers still in flight (the engine steps to see them end)."""
        return bool(self.requests) or (self.kv_connector is not None and self.kv_connector.busy)

    # ---- the step ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        failed = self._admit_compiled() if self.waiting_for_grammar else []
        if self.kv_connector is not None:
            self._update_remote_prefills()
        batch = self.scheduler.schedule()
        if batch.remote_prefills:
            self._read_remote_prefills(batch.remote_prefills)
        if not batch.seqs:
            finished = [*failed, *self._hand_over_prefills()]
            if self.waiting_for_grammar and not finished:  # nothing to run but compiles: wait a little, no spin
                wait([r.grammar for r in self.waiting_for_grammar.values()], GRAMMAR_WAIT_S, FIRST_COMPLETED)
            elif not finished and self.kv_connector is not None:
                self.kv_connector.idle()
            return self._outputs(finished)
        inputs = self.runner.prepare(batch)
        hidden = self.runner.forward(inputs)
        sampling = [(seq, row) for seq, row in zip(batch.seqs, inputs.sample_rows) if row >= 0]
        seqs = [seq for seq, _ in sampling]
        # host work while the device runs the forward pass just launched (on the CPU it simply comes after it)
        bitmask = self.structured_output.fill_bitmask([s.grammar for s in seqs]) if self.structured_output else None
        self.scheduler.computed(batch)
        for phase, rows in inputs.rows_per_phase.items():
            self.tokens_computed[(phase.value, self.config.precision(phase))] += rows
        for i, rows in inputs.prompt_logprob_rows.items():
            self._record_prompt_logprobs(batch.seqs[i], hidden, rows)

        handed_over = self._hand_over_prefills()
        if sampling:
            logits = self.runner.logits(hidden, [row for _, row in sampling])
            stop_ids = [self.eos_token_ids | set(s.params.stop_token_ids) if not s.params.ignore_eos
                        else set(s.params.stop_token_ids) for s in seqs]
            result = sample(logits, seqs, stop_ids, self.default_generator, bitmask)
            now = time.monotonic()
            for row, seq in enumerate(seqs):
                self._append_token(seq, result, row, now)
        return self._outputs([seq.request_id for seq in batch.seqs] + failed + list(handed_over))

    def _outputs(self, request_ids: list[str]) -> list[RequestOutput]:
        """The outputs of these requests (each once); finished ones are forgotten."""
        outputs = [self._output(self.requests[rid]) for rid in dict.fromkeys(request_ids) if rid in self.requests]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def _append_token(self, seq: Sequence, result, row: int, now: float):
        token = result.token_ids[row]
        seq.token_ids.append(token)
        grammar_done = seq.grammar is not None and self.structured_output.accept(seq.grammar, token)
        seq.first_token_time = seq.first_token_time or now
        self.num_generation_tokens += 1
        if seq.num_output_tokens == 1 and seq.index == 0:  # a request's prompt counts once, whatever its n
            self.num_prompt_tokens += seq.num_prompt_tokens
        if seq.logprobs is not None:
            seq.cumulative_logprob += result.logprobs[row]
            seq.logprobs.append(self._logprob_entry(token, result.logprobs[row], result.ranks[row],
                                                    result.top_ids[row], result.top_logprobs[row]))
        self._check_stop_token(seq, token)
        if seq.finish_reason is None:  # a stopping token's own text is left out, as vLLM does
            self._check_stop_text(seq, self._detokenize(seq))
        if seq.finish_reason is None and grammar_done:  # it took a stop token that ignore_eos let through
            seq.finish_reason = "stop"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _logprob_entry(self, token: int, logprob: float, rank: int, top_ids: list[int],
                       top_logprobs: list[float]) -> dict[int, Logprob]:
        """The chosen token first (with its true rank), then the top-k ranked 1..k, as vLLM returns them."""
        entry = {token: Logprob(logprob, rank, self._decode_token(token))}
        for k, (tid, lp) in enumerate(zip(top_ids, top_logprobs), start=1):
            entry.setdefault(tid, Logprob(lp, k, self._decode_token(tid)))
        return entry

    def _decode_token(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""

    def _detokenize(self, seq: Sequence) -> str:
        """Incremental detokenization over a small window, so multi-token characters come out whole."""
        if self.tokenizer is None:
            return ""
        skip = seq.params.skip_special_tokens
        prefix = self.tokenizer.decode(seq.token_ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(seq.token_ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, seq.num_tokens
            seq.output_text += new_text
            return new_text
        return ""

    def _check_stop_token(self, seq: Sequence, token: int):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            return
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token

    def _check_stop_text(self, seq: Sequence, new_text: str):
        p = seq.params
        if p.stop_strings and new_text and seq.num_output_tokens >= p.min_tokens:
            self._check_stop_strings(seq, new_text)
        if seq.finish_reason is None and p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is None and seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_text: str):
        p = seq.params
        longest = max(len(s) for s in p.stop_strings)
        search_from = max(len(seq.output_text) - len(new_text) - longest + 1, 0)
        found = [(seq.output_text.find(s, search_from), s) for s in p.stop_strings]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, stop = min(found)
            seq.output_text = seq.output_text[:index + (len(stop) if p.include_stop_str_in_output else 0)]
            seq.finish_reason, seq.stop_reason = "stop", stop

    def _record_prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, rows: list[int]):
        if seq.index != 0 or not rows:
            return
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        logprobs = torch.log_softmax(self.runner.logits(hidden, rows), dim=-1)
        k = seq.params.prompt_logprobs
        start = len(seq.prompt_logprobs)
        targets = torch.tensor(seq.token_ids[start:start + len(rows)], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for r, token in enumerate(targets.tolist()):
            seq.prompt_logprobs.append(self._logprob_entry(
                token, chosen[r, 0].item(), ranks[r], top_ids[r].tolist() if k else [],
                top_lp[r].tolist() if k else []))

    # ---- outputs ------------------------------------------------------------------------------------------------

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            text = seq.output_text
            if seq.finish_reason is None and seq.params.stop_strings:
                # hold back what could still turn out to be the start of a stop string
                text = text[:max(len(text) - max(len(s) for s in seq.params.stop_strings) + 1, 0)]
            outputs.append(CompletionOutput(seq.index, text, list(seq.output_token_ids),
                                            seq.cumulative_logprob if seq.logprobs is not None else None,
                                            list(seq.logprobs) if seq.logprobs is not None else None,
                                            seq.finish_reason, seq.stop_reason))
        first = request.seqs[0]
        finished = all(s.finish_reason is not None for s in request.seqs)
        metrics = {"arrival_time": request.arrival_time}
        if first.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = first.first_scheduled_time
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, finished,
                             first.prompt_logprobs, first.num_cached_tokens, metrics, request.kv_transfer_params)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_requests_running": len({s.request_id for s in self.scheduler.running}),
            "num_requests_waiting": len({s.request_id for s in [*self.scheduler.waiting, *self.scheduler.loading]} -
                                        {s.request_id for s in self.scheduler.running}) + len(self.waiting_for_grammar),
            "kv_cache_usage": bm.usage(),
            "num_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_window_blocks_released": bm.window_blocks_released,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
            "tokens_computed": {f"{phase}/{precision}": n for (phase, precision), n in self.tokens_computed.items()},
            **(bm.state_slots.stats() if bm.state_slots is not None else {}),
            **({"kv_transfer": self.kv_connector.stats()} if self.kv_connector is not None else {}),
        }

    def shutdown(self):
        """Gives back what garbage collection would not: the KV connector's side channel and registered memory."""
        if self.kv_connector is not None:
            self.kv_connector.close()

    def kv_cache_tokens(self) -> int:
        """The most tokens one sequence can hold in the KV cache (with sliding-window layers, fewer than the units
        times block_size: their blocks within the window take units too)."""
        return self.model_runner.kv_layout.max_tokens(self.runner.num_blocks, self.config.max_num_batched_tokens)

    # ---- scoring -------------------------------------------------------------------------------------------------

    def teacher_forced_logprobs(self, prompt_token_ids: list[int], continuation: list[int]) -> torch.Tensor:
        """Log-probabilities of the next token after the prompt and after each continuation token, as this engine
        would compute them while generating that continuation: prompt tokens (but the last) in the prefill
        precision, the last prompt token and the continuation in the decode precision.

        Returns float32 [len(continuation) + 1, vocab] (row i predicts the token after continuation[:i]). Run it
        with no other requests in flight.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("teacher_forced_logprobs runs alone: finish or abort the engine's requests first")
        self._validate_prompt(list(prompt_token_ids) + list(continuation))
        # prompt_logprobs: like any request that scores its own tokens, it computes them all (no prefix-cache hits)
        seq = Sequence("score", 0, list(prompt_token_ids) + list(continuation),
                       SamplingParams(max_tokens=1, prompt_logprobs=0))
        seq.num_prompt_tokens = len(prompt_token_ids)  # the phase boundary stays at the real prompt's end
        if not self.block_manager.allocate(seq):
            raise ValueError(f"{seq.num_tokens} tokens do not fit in the KV cache")
        first_scored = phase_boundary(seq.num_prompt_tokens)
        rows: list[torch.Tensor] = []
        try:
            while seq.num_computed_tokens < seq.num_tokens:
                start = seq.num_computed_tokens
                n = min(seq.num_tokens - start, self.config.max_num_batched_tokens)
                batch = ScheduledBatch([seq], [n])
                inputs = self.runner.prepare(batch)
                hidden = self.runner.forward(inputs)
                # rows are [prefill part | decode part] of this chunk, i.e. in position order
                scored = [p - start for p in range(max(start, first_scored), start + n)]
                if scored:
                    rows.append(torch.log_softmax(self.runner.logits(hidden, scored), dim=-1))
                self.scheduler.computed(batch)
        finally:
            self.block_manager.free_sequence(seq)
        return torch.cat(rows)

    # ---- KV export / import (the building block of a disaggregated prefill/decode mode) -------------------------

    def export_kv(self, request_id: str) -> dict:
        """The computed KV of a request's first sequence, block by block, with the tokens it covers."""
        self._check_kv_transfer()
        seq = self.requests[request_id].seqs[0]
        full = min(seq.num_computed_tokens, phase_boundary(seq.num_prompt_tokens))
        blocks = seq.block_table[:self.block_manager.blocks_needed(full)]
        return {"token_ids": seq.token_ids[:full], "prefill_precision": self.config.prefill_precision,
                "kv": self.runner.read_kv_blocks(blocks).cpu()}

    def _check_kv_transfer(self):
        """KV moved between engines (export/import, or a disaggregated instance's NIXL transfers) carries no
        recurrent state, and the blocks of one cache group (not those of sliding-window layers)."""
        self.model_runner.check_block_transfer()
        if self.model_runner.state_pool is not None:
            raise ValueError("KV transfer does not carry the recurrent state of Gated DeltaNet layers, without which "
                             "the KV alone resumes nothing: not supported for this model (export_kv, "
                             "add_request_with_kv, --kv-transfer-config)")

    def add_request_with_kv(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                            exported: dict):
        """Adds a request whose leading KV was computed elsewhere (e.g. a prefill worker's export_kv).

        Only prefill-phase KV is taken (at most all prompt tokens but the last), so this engine computes the last
        prompt token and every generated token in its own decode precision, as the paper's decode server does.
        """
        self._check_kv_transfer()
        if params.structured_outputs is not None:
            raise ValueError("structured outputs are not supported for a request with imported KV")
        self.add_request(request_id, prompt_token_ids, params)
        n = min(len(exported["token_ids"]), phase_boundary(len(prompt_token_ids)))
        if exported["token_ids"][:n] != list(prompt_token_ids[:n]):
            self.abort_request(request_id)
            raise ValueError("the exported KV was computed for other tokens than this prompt")
        bs = self.config.block_size
        n -= n % bs  # whole blocks only
        for seq in self.requests[request_id].seqs:
            self.scheduler.waiting.remove(seq)
            if not self.block_manager.allocate(seq):
                self.abort_request(request_id)
                raise ValueError("not enough free KV blocks to import this request")
            if seq.num_computed_tokens < n:
                first = seq.num_computed_tokens // bs  # blocks before this came from the local prefix cache
                self.runner.write_kv_blocks(seq.block_table[first:n // bs], exported["kv"][:, :, first:n // bs])
                # cached under the precision that computed them, so local prompts of another precision miss them
                seq.num_imported_tokens, seq.imported_kv_precision = n, exported["prefill_precision"]
                seq.num_computed_tokens = n
                self.block_manager.register_computed_blocks(seq)
            seq.status = seq.status.RUNNING
            self.scheduler.running.append(seq)

    # ---- disaggregated prefill and decode: kv_transfer_params (vLLM's proxy protocol) ----------------------------

    def _kv_transfer_request(self, request_id: str, params: SamplingParams,
                             token_ids: list[int]) -> tuple[bool, RemotePrefill | None]:
        """What a request's kv_transfer_params ask: to compute its prompt's KV for a decode instance (remote_decode),
        or to read it from a prefill instance (remote_prefill) rather than compute it."""
        kv = params.kv_transfer_params or {}
        role = self.config.kv_transfer_config
        if self.config.prefill_only and not kv.get("do_remote_decode"):
            raise ValueError('this instance only prefills (kv_role kv_producer): requests must carry '
                             'kv_transfer_params {"do_remote_decode": true}, as a disaggregated proxy sends them')
        if kv.get("do_remote_decode"):
            if role is None or not role.prefills_for_others:
                raise ValueError("kv_transfer_params.do_remote_decode: this instance does not prefill for others "
                                 "(start it with --kv-transfer-config and kv_role kv_both or kv_producer)")
            return True, None
        if not kv.get("do_remote_prefill"):
            return False, None
        if role is None or not role.decodes_for_others:
            raise ValueError("kv_transfer_params.do_remote_prefill: this instance does not decode for others "
                             "(start it with --kv-transfer-config and kv_role kv_both or kv_consumer)")
        remote = RemotePrefill.from_params(kv)
        if not remote.block_ids:  # a one-token prompt: the prefill instance holds nothing
            return False, None
        problem = self._unreadable(remote, params, token_ids)
        if problem:
            self.kv_connector.fall_back(remote, request_id, *problem)
            return False, None
        return False, remote

    def _unreadable(self, remote: RemotePrefill, params: SamplingParams,
                    token_ids: list[int]) -> tuple[str, str] | None:
        """(reason, detail) when a prefill instance's KV cannot serve this request."""
        boundary = phase_boundary(len(token_ids))
        if remote.num_tokens != boundary or remote.prompt_digest != prompt_digest(token_ids[:boundary]):
            return "prompt_mismatch", "the prefill instance computed another prompt"
        if remote.block_size != self.config.block_size:
            return "layout_mismatch", f"its KV blocks hold {remote.block_size} tokens, ours {self.config.block_size}"
        if params.n > 1:
            return "n_above_1", "n > 1 (only single-sequence requests read remote KV)"
        if params.prompt_logprobs is not None:
            return "prompt_logprobs", "prompt logprobs need the prompt's logits, computed here"
        return None

    def _read_remote_prefills(self, seqs: list[Sequence]):
        """Starts reading the blocks admitted sequences lack from their prefill instance."""
        for seq in seqs:
            remote = seq.remote_prefill
            if seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV:
                first, end = seq.num_computed_tokens // self.config.block_size, len(remote.block_ids)
                self.kv_connector.load(seq, seq.block_table[first:end], remote.block_ids[first:end])
            else:  # its prefix cache held all of it
                self.kv_connector.release(remote)
                seq.remote_prefill = None

    def _update_remote_prefills(self):
        """Sequences whose blocks have been read run from here on; those whose read failed compute their prompt."""
        for seq, ok in self.kv_connector.poll():
            remote, seq.remote_prefill = seq.remote_prefill, None
            if ok:
                seq.num_computed_tokens = remote.num_tokens
                self.block_manager.register_computed_blocks(seq)
                self.scheduler.loaded(seq)
            else:
                seq.num_imported_tokens = 0
                self.scheduler.requeue(seq)

    def _hand_over_prefills(self) -> set[str]:
        """Ends prefill-only requests whose KV is complete: the KV connector holds their blocks for a decode
        instance, and their output says where (kv_transfer_params)."""
        finished = set()
        for seq in list(self.scheduler.finished_prefills):
            if self.kv_connector is not None:  # else a warm-up request: nobody to hand it to
                self.requests[seq.request_id].kv_transfer_params = self.kv_connector.hold(
                    seq.request_id, seq.block_table, seq.token_ids[:seq.num_target_tokens])
            seq.finish_reason = "length"
            self.scheduler.finish(seq)
            self.num_prompt_tokens += seq.num_prompt_tokens
            finished.add(seq.request_id)
        return finished
