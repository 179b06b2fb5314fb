"""The per-step forward context: what every layer needs to know about the batch, set once per step.

Rows of a step are laid out as [prefill rows | decode rows], so a linear layer routes its rows to the two
precisions with one slice, and attention reads its segments from here instead of through every signature.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch


@dataclass
class AttentionSegment:
    """Query rows [row_start, row_end) of one sequence, at positions [context_start, context_start + length)."""

    row_start: int
    row_end: int
    context_start: int
    block_table: torch.Tensor  # block ids holding positions [0, context_start + length)


@dataclass
class StateSegments:
    """The step's rows by sequence, for layers that carry a state from one step to the next (Gated DeltaNet).

    Segment i is rows [bounds[i], bounds[i + 1]) of one sequence: the prefill rows' segments first, then the decode
    rows'. A sequence has at most one segment in each group, so a layer that runs the prefill group and then the
    decode group reads and writes each state slot once per group, a prompt's chunk before its first decode row."""

    slots: torch.Tensor  # [segments] int64: each segment's state slot (engine/state_slots.py)
    resume: torch.Tensor  # [segments] bool: continue the slot's state; False: the segment starts its sequence
    bounds: list[int]  # segments + 1 row offsets, on the host (the CPU reference loops over segments)
    cu_seqlens: torch.Tensor  # the same offsets on the device, int64 (varlen kernels)
    num_prefill: int  # segments [0, num_prefill) are those of the prefill rows

    def prefill(self) -> StateSegments | None:
        return self._group(0, self.num_prefill, self.num_prefill)

    def decode(self) -> StateSegments | None:
        """The decode rows' segments, their rows counted from the first decode row."""
        return self._group(self.num_prefill, len(self.bounds) - 1, 0)

    def _group(self, first: int, end: int, num_prefill: int) -> StateSegments | None:
        if first == end:
            return None
        offset = self.bounds[first]
        return StateSegments(self.slots[first:end], self.resume[first:end],
                             [b - offset for b in self.bounds[first:end + 1]],
                             self.cu_seqlens[first:end + 1] - offset, num_prefill)


@dataclass
class ForwardContext:
    num_prefill_rows: int
    slot_mapping: torch.Tensor  # [rows] flat KV slot each row writes
    segments: list[AttentionSegment] | None = None  # general path: any mix of prefill and decode rows
    # The last len(context_lens) rows, single-token decode rows, attend as one batch through the paged cache; in a
    # decode-only step (no segments) that is every row, in tensors of fixed shape a CUDA graph can capture.
    block_tables: torch.Tensor | None = None  # [decode rows, max_blocks]
    context_lens: torch.Tensor | None = None  # [decode rows]
    # EngineConfig.prefill_attention: "fp8" / "fp8-cudnn" run prefill segments with nothing cached in FP8, those of
    # fp8_attention_min_tokens or more (EngineConfig.fp8_attention_min_tokens)
    prefill_attention: str = "bf16"
    fp8_attention_min_tokens: int = 0
    state: StateSegments | None = None  # models with per-sequence state (ModelRunner.state_pool)
    # The other KV cache groups (engine/kv_cache.py: sliding-window layers' units), each with its own slots and
    # tables for the same rows; this context itself is group 0's.
    kv_groups: list[ForwardContext] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        return self.segments is None

    def for_kv_group(self, group: int) -> ForwardContext:
        return self if group == 0 else self.kv_groups[group - 1]

    def prefill_part(self, split: int) -> ForwardContext:
        """The first `split` rows alone (every prefill segment, no batched decode tail), in every cache group."""
        return replace(self, slot_mapping=self.slot_mapping[:split], block_tables=None, context_lens=None,
                       state=self.state.prefill() if self.state else None,
                       kv_groups=[g.prefill_part(split) for g in self.kv_groups])

    def decode_part(self, split: int) -> ForwardContext:
        """The rows from `split` on alone: the batched single-token decode tail, in every cache group."""
        return ForwardContext(0, self.slot_mapping[split:], block_tables=self.block_tables,
                              context_lens=self.context_lens, state=self.state.decode() if self.state else None,
                              kv_groups=[g.decode_part(split) for g in self.kv_groups])

    def padded_prefill(self, rows: int, scratch_slot: int) -> ForwardContext:
        """The prefill rows padded to `rows` rows, which write their K/V to `scratch_slot` of every group and belong
        to no attention segment."""
        slots = torch.full((rows,), scratch_slot, dtype=torch.long, device=self.slot_mapping.device)
        slots[:self.num_prefill_rows] = self.slot_mapping[:self.num_prefill_rows]
        return replace(self, num_prefill_rows=rows, slot_mapping=slots, block_tables=None, context_lens=None,
                       kv_groups=[g.padded_prefill(rows, scratch_slot) for g in self.kv_groups])


_CONTEXT: ForwardContext | None = None


def get_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("no forward context is set: model layers run only inside forward_context()")
    return _CONTEXT


@contextmanager
def forward_context(ctx: ForwardContext):
    global _CONTEXT
    if _CONTEXT is not None:
        raise RuntimeError("forward contexts do not nest")
    _CONTEXT = ctx
    try:
        yield ctx
    finally:
        _CONTEXT = None
