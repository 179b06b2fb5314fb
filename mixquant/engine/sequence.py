"""A sequence: one completion of a request (a request with n=4 has four), its tokens, KV blocks and output state."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import torch

from mixquant.config import phase_boundary
from mixquant.distributed.kv_transfer import RemotePrefill
from mixquant.outputs import PositionLogprobs
from mixquant.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mixquant.structured_output import SequenceGrammar


class SequenceStatus(Enum):
    WAITING = auto()
    WAITING_FOR_REMOTE_KV = auto()  # admitted, its blocks being read from a prefill instance
    RUNNING = auto()
    FINISHED = auto()


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hits at first admission
    block_table: list[int] = field(default_factory=list)
    # per block index, the units holding it for the sliding-window layers (None: before the window; see
    # engine/block_manager.py); empty for models without such layers
    window_table: list[tuple[int, ...] | None] = field(default_factory=list)
    num_hashed_blocks: int = 0
    state_slot: int | None = None  # recurrent-state slot (models with Gated DeltaNet layers; engine/state_slots.py)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    output_text: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # first admitted to a step (its first tokens computed then)
    first_token_time: float | None = None
    num_preemptions: int = 0
    num_imported_tokens: int = 0  # leading positions whose KV came from another engine (a prefill instance)
    imported_kv_precision: str = ""
    grammar: SequenceGrammar | None = None  # set once the request's structured-output grammar has compiled
    remote_decode: bool = False  # on a prefill instance: compute the prompt's KV for a decode instance, sample nothing
    remote_prefill: RemotePrefill | None = None  # on a decode instance: the prompt's KV is to be read from there

    def __post_init__(self):
        self.num_prompt_tokens = len(self.token_ids)
        self.prefix_offset = max(self.num_prompt_tokens - 6, 0)  # incremental detokenization window
        self.read_offset = self.num_prompt_tokens
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_target_tokens(self) -> int:
        """Positions this engine computes KV for: all, or for a decode instance every prompt token but the last."""
        return phase_boundary(self.num_prompt_tokens) if self.remote_decode else self.num_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_target_tokens - self.num_computed_tokens
