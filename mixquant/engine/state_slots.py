"""Per-sequence state of recurrent layers (Qwen3.5's Gated DeltaNet): the pool that holds it, the slots sequences
hold, and the snapshots that prefix caching resumes from.

Such a state is a fold over every token so far, so unlike KV it cannot be rebuilt from cached blocks: a prefix-cache
hit may resume a sequence only at a position where the state was saved. Snapshots are saved where a step ends on the
block grid, at three kinds of position:
- the last whole block of each prompt before its phase boundary: the next turn of a conversation re-sends this
  prompt and resumes here;
- where a sequence's KV prefix hit ended, if that is past the snapshot it resumed from: other requests share its
  prompt up to there (a system prompt), so the next one resumes here;
- optionally every `interval` prompt tokens.
A snapshot is keyed by the hash of the block it ends on, which covers every token before it and the precision each
was computed in (block_manager.block_hash), so it is found exactly when the KV blocks it goes with are, and dropped
when its block is evicted. The scheduler ends a sequence's chunk at its next snapshot position; the block manager
cuts every hit back to the deepest block a snapshot ends on.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from mixquant.config import phase_boundary
from mixquant.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class StatePool:
    """The state tensors: per state kind (e.g. conv_state, recurrent_state), one [layers, rows, *shape] tensor whose
    row r, across layers, holds one sequence's state. Rows [0, num_slots) are the sequences' slots, row num_slots the
    scratch row that padded CUDA-graph rows write, the rest snapshots."""

    def __init__(self, layers: list, num_slots: int, num_snapshots: int, dtype: torch.dtype, device: torch.device):
        shapes = layers[0].state_shapes(dtype)
        if any(layer.state_shapes(dtype) != shapes for layer in layers):
            raise ValueError("recurrent layers of different state shapes are not supported")
        self.num_slots, self.scratch_slot = num_slots, num_slots
        self.snapshot_rows = list(range(num_slots + 1, num_slots + 1 + num_snapshots))
        rows = num_slots + 1 + num_snapshots
        self.tensors = {name: torch.zeros(len(layers), rows, *shape, dtype=state_dtype, device=device)
                        for name, (shape, state_dtype) in shapes.items()}
        for i, layer in enumerate(layers):
            for name, tensor in self.tensors.items():
                setattr(layer, name, tensor[i])
        self.bytes_per_row = sum(t[:, 0].numel() * t.element_size() for t in self.tensors.values())

    def copy(self, src: int, dst: int):
        for tensor in self.tensors.values():
            tensor[:, dst].copy_(tensor[:, src])

    def describe(self) -> str:
        mib = self.bytes_per_row / 2**20
        return (f"{mib:.2f} MiB of recurrent state per sequence; {self.num_slots} slots "
                f"({self.num_slots * mib / 1024:.2f} GiB) and {len(self.snapshot_rows)} prefix-cache snapshots "
                f"({len(self.snapshot_rows) * mib / 1024:.2f} GiB)")


class StateSlots:
    """Bookkeeping beside the BlockManager: which sequence holds which slot, and which snapshot ends on which block.

    Every slot or snapshot move is a row copy in the pool, made as it is decided (in stream order on a GPU), so a
    snapshot is copied before the slot it came from can be reused."""

    def __init__(self, pool: StatePool, block_size: int, interval: int):
        self.pool, self.block_size, self.interval = pool, block_size, interval
        self.free_slots = list(range(pool.num_slots - 1, -1, -1))
        self.free_rows = list(pool.snapshot_rows)
        self.snapshots: OrderedDict[int, int] = OrderedDict()  # block hash -> snapshot row, least recently used first
        self.shared_ends: dict[int, int] = {}  # seq_id -> where its KV hit ended, past its snapshot
        self.num_saved = self.num_resumed = 0

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def allocate(self, seq: Sequence, resume_from: int | None, cached_end: int):
        """A slot for seq; with resume_from (a block hash), the state saved at the end of that block copied in.
        cached_end: where seq's KV prefix hit ended before it was cut back to a snapshot."""
        seq.state_slot = self.free_slots.pop()
        if resume_from is not None:
            self.snapshots.move_to_end(resume_from)
            self.pool.copy(self.snapshots[resume_from], seq.state_slot)
            self.num_resumed += 1
        if cached_end > seq.num_computed_tokens:
            self.shared_ends[seq.seq_id] = cached_end

    def free(self, seq: Sequence):
        if seq.state_slot is not None:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = None
        self.shared_ends.pop(seq.seq_id, None)

    def has_snapshot(self, block_hash: int) -> bool:
        return block_hash in self.snapshots

    def next_snapshot(self, seq: Sequence) -> int | None:
        """The next position after seq's computed tokens where its state is saved, if any."""
        end, done = self._prompt_end(seq), seq.num_computed_tokens
        if not self.pool.snapshot_rows:
            return None
        positions = [end, self.shared_ends.get(seq.seq_id, 0)]
        if self.interval and done < end:
            positions.append((done // self.interval + 1) * self.interval)
        return min((p for p in positions if p > done), default=None)

    def is_snapshot_position(self, seq: Sequence) -> bool:
        end, done = self._prompt_end(seq), seq.num_computed_tokens
        return bool(self.pool.snapshot_rows) and done > 0 and (
            done in (end, self.shared_ends.get(seq.seq_id)) or (self.interval > 0 and done < end
                                                                 and done % self.interval == 0))

    def _prompt_end(self, seq: Sequence) -> int:
        """The last block boundary at or before seq's phase boundary: the next turn's prompt matches up to here."""
        return phase_boundary(seq.num_prompt_tokens) // self.block_size * self.block_size

    def save(self, seq: Sequence, block_hash: int):
        """seq's state, which has just reached the end of the block `block_hash`, as that block's snapshot; the least
        recently used snapshot makes room."""
        if block_hash in self.snapshots:  # an equal state, computed by another sequence with the same prefix
            self.snapshots.move_to_end(block_hash)
            return
        if not self.free_rows:
            _, row = self.snapshots.popitem(last=False)
            self.free_rows.append(row)
        row = self.free_rows.pop()
        self.pool.copy(seq.state_slot, row)
        self.snapshots[block_hash] = row
        self.num_saved += 1

    def forget(self, block_hash: int):
        """The block a snapshot ends on was evicted: no hit can reach the snapshot any more."""
        row = self.snapshots.pop(block_hash, None)
        if row is not None:
            self.free_rows.append(row)

    def stats(self) -> dict:
        return {"state_slots_used": self.pool.num_slots - self.num_free_slots,
                "state_slots": self.pool.num_slots,
                "state_snapshots": len(self.snapshots),
                "state_snapshot_rows": len(self.pool.snapshot_rows),
                "state_snapshots_saved": self.num_saved,
                "state_snapshots_resumed": self.num_resumed,
                "state_bytes_per_sequence": self.pool.bytes_per_row}
