"""Constrained decoding with xgrammar: grammars compiled once per spec in a worker, one matcher per sequence,
and each step's token bitmask of the constrained rows.

A request's grammar compiles in a worker thread (xgrammar releases the GIL while compiling) while the request waits
outside the scheduler, so a slow compile never holds up other requests' steps; compiled grammars are cached by
their spec. Each step, after the forward pass is launched, the bitmasks of the rows being constrained are filled on
the host in one batched call; on a GPU that overlaps the forward pass, on the CPU it runs after it. The sampler
applies the bitmask, and every accepted token advances the sequence's matcher; the sequence finishes when its
grammar terminates (a grammar that is complete allows only the stop tokens).

Why xgrammar rather than llguidance: docs/serving.md, "Structured outputs".
"""
from __future__ import annotations

import concurrent.futures
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mixquant.layers.sampler import TokenBitmask, apply_token_bitmask
from mixquant.sampling_params import StructuredOutputsParams
from mixquant.structured_output.grammars import build_grammar

MAX_CACHED_GRAMMARS = 512


@dataclass(eq=False)
class SequenceGrammar:
    """A sequence's place in its grammar. While reasoning_end_id is set the output is free reasoning; the token
    after that one is the first the grammar constrains."""
    matcher: object  # xgrammar.GrammarMatcher
    reasoning_end_id: int | None = None

    @property
    def constrained(self) -> bool:
        return self.reasoning_end_id is None


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int], device: torch.device):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.device = device
        # one worker: compiles queue behind each other instead of taking the cores the engine steps on
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mixquant-grammar")
        self.compiled: OrderedDict[tuple, concurrent.futures.Future] = OrderedDict()
        self._compiler = None  # built by the worker on first use (Qwen3's vocabulary takes about a second)
        self._batch_matcher = None
        self._bitmask: torch.Tensor | None = None

    # ---- grammars (the engine thread) ----------------------------------------------------------------------------

    def compile(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compiled grammar of `params`, as a future; ValueError at once if the spec is invalid."""
        key = params.key
        future = self.compiled.get(key)
        if future is None:
            grammar = build_grammar(params)
            future = self.executor.submit(self._compile, grammar)
            self.compiled[key] = future
            if len(self.compiled) > MAX_CACHED_GRAMMARS:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        return future

    def _compile(self, grammar):
        return self._get_compiler().compile_grammar(grammar)

    def _get_compiler(self):  # the worker's only
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def reasoning_end_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"reasoning_end {text!r} must be one token of the vocabulary, it is {len(ids)}")
        return ids[0]

    @staticmethod
    def new_sequence_grammar(compiled, reasoning_end_id: int | None) -> SequenceGrammar:
        import xgrammar as xgr

        return SequenceGrammar(xgr.GrammarMatcher(compiled), reasoning_end_id)

    def warm_up(self):
        """Masks one row of logits on the device, so that the first constrained step pays neither for importing
        xgrammar nor for compiling its masking kernel (Triton's, on a GPU)."""
        import xgrammar as xgr

        logits = torch.zeros(1, self.vocab_size, device=self.device)
        apply_token_bitmask(logits, TokenBitmask([0], xgr.allocate_token_bitmask(1, self.vocab_size)))

    # ---- each step ---------------------------------------------------------------------------------------------

    def fill_bitmask(self, grammars: list[SequenceGrammar | None]) -> TokenBitmask | None:
        """The allowed tokens of every row whose grammar constrains its next token (None if no row's does)."""
        rows = [row for row, grammar in enumerate(grammars) if grammar is not None and grammar.constrained]
        if not rows:
            return None
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < len(grammars):
            self._bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
            if self.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()  # so the copy to the device does not block
            self._batch_matcher = self._batch_matcher or xgr.BatchGrammarMatcher()
        bits = self._bitmask[:len(grammars)]
        self._batch_matcher.batch_fill_next_token_bitmask([grammars[row].matcher for row in rows], bits, rows)
        return TokenBitmask(rows, bits)

    @staticmethod
    def accept(grammar: SequenceGrammar, token: int) -> bool:
        """Advances the grammar by a sampled token; True once the grammar has terminated."""
        if not grammar.constrained:
            if token == grammar.reasoning_end_id:
                grammar.reasoning_end_id = None
            return False
        if not grammar.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own bitmask allowed")
        return grammar.matcher.is_terminated()
