"""Sampling parameters, shaped like vLLM's so its users feel at home."""
from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass, field

STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's StructuredOutputsParams): exactly one of

    - json: a JSON schema (a dict or its text);
    - regex: a regular expression the whole output matches;
    - choice: a list of strings, the output is one of them;
    - grammar: an EBNF grammar with a `root` rule (GBNF, as vLLM's xgrammar backend takes it);
    - json_object: True for any JSON object;
    - structural_tag: an xgrammar structural tag (a dict or its text), as vLLM passes it.

    any_whitespace lets JSON hold whitespace between its tokens (pretty-printed output, up to 20 characters in a
    row). Off by default (unlike vLLM): JSON comes out on one line with ", " and ": ", since a model held to a schema
    may otherwise pour its probability into newlines.
    reasoning_end (ours): the output opens with a free reasoning section that ends with this token (e.g.
    "</think>"); the constraint applies from the token after it, as vLLM does under a reasoning parser.
    """
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    any_whitespace: bool = False
    reasoning_end: str | None = None

    def __post_init__(self):
        given = [kind for kind in STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams needs exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}, "
                             f"got {', '.join(given) or 'none'}")
        for kind in ("json", "structural_tag"):
            value = getattr(self, kind)
            if isinstance(value, str):
                try:
                    value = jsonlib.loads(value)
                except ValueError as e:
                    raise ValueError(f"StructuredOutputsParams.{kind} is not valid JSON: {e}") from e
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"StructuredOutputsParams.{kind} must be a JSON object, got {type(value).__name__}")
            setattr(self, kind, value)
        for kind in ("regex", "grammar", "reasoning_end"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{kind} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"StructuredOutputsParams.choice must be a list of non-empty strings, got {self.choice!r}")
        if self.json_object not in (None, True):
            raise ValueError(f"StructuredOutputsParams.json_object must be True or None, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return next(kind for kind in STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False))

    @property
    def key(self) -> tuple:
        """What the compiled grammar depends on (reasoning_end is the engine's business, not the grammar's)."""
        value = getattr(self, self.kind)
        return self.kind, jsonlib.dumps(value, ensure_ascii=False), self.any_whitespace


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's disaggregated prefill protocol: {"do_remote_decode": true} to a prefill instance, its answer to a
    # decode instance (mixquant/distributed/kv_transfer.py)
    kv_transfer_params: dict | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        if self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self):
        def fail(name: str, why: str):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.temperature < 0:
            fail("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be -1, 0 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            fail("logprobs", "must be an integer >= 0 or None")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or self.prompt_logprobs < 0
        ):
            fail("prompt_logprobs", "must be an integer >= 0 or None")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0")
        if not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", "must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            fail("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of non-negative integers")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                fail("structured_outputs", "must be a StructuredOutputsParams")
            if self.min_tokens:
                fail("min_tokens", "cannot be combined with structured_outputs (the grammar decides where the output "
                                   "ends)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
