"""Paged KV blocks with automatic prefix caching of full blocks.

A full block is registered under a hash of (previous block's hash, the precision that wrote it, its tokens).
The precision is part of the key because the phase rule makes KV depend on where a token sat: a block that
held generated (decode-precision) tokens is not what a prompt (prefill-precision) run would have written, so it
is reused only by a sequence that would write it the same way. Hits are verified against the stored tokens.
Freed blocks keep their contents until reallocated, oldest first.

Models with recurrent layers (Qwen3.5) also hold a state slot per sequence (engine/state_slots.py), taken and given
back with the blocks; their hits are cut back to the deepest block a state snapshot ends on.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import xxhash

from mixquant.config import phase_boundary
from mixquant.engine.sequence import Sequence
from mixquant.engine.state_slots import StateSlots


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] = []


def block_hash(previous: int | None, writer: str, token_ids: list[int]) -> int:
    h = xxhash.xxh64()
    if previous is not None:
        h.update(previous.to_bytes(8, "little"))
    h.update(writer.encode())
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


def across_boundary(before: str, num_before: int, after: str) -> str:
    return before if before == after else f"{before}<{num_before}>{after}"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, prefill_precision: str,
                 decode_precision: str, state_slots: StateSlots | None = None):
        self.block_size = block_size
        self.state_slots = state_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.prefill_precision, self.decode_precision = prefill_precision, decode_precision
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up, as vLLM counts them
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def writer(self, seq: Sequence, block_index: int) -> str:
        """The precision that wrote a block's KV; a block across the phase boundary names both and where.

        Imported KV (from a prefill instance) ends at the phase boundary or at a block's end."""
        start, end = block_index * self.block_size, (block_index + 1) * self.block_size
        imported = seq.num_imported_tokens
        if end <= imported:
            return seq.imported_kv_precision
        if start < imported:
            return across_boundary(seq.imported_kv_precision, imported - start, self.decode_precision)
        boundary = phase_boundary(seq.num_prompt_tokens)
        if end <= boundary:
            return self.prefill_precision
        if start >= boundary:
            return self.decode_precision
        return across_boundary(self.prefill_precision, boundary - start, self.decode_precision)

    def _hash_chain(self, seq: Sequence, num_blocks: int, start: int = 0, previous: int | None = None):
        bs = self.block_size
        for i in range(start, num_blocks):
            previous = block_hash(previous, self.writer(seq, i), seq.token_ids[i * bs:(i + 1) * bs])
            yield i, previous

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding seq's leading full blocks; the last token to compute is never taken from the cache."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits = []
        bs = self.block_size
        for i, h in self._hash_chain(seq, (seq.num_target_tokens - 1) // bs):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != seq.token_ids[i * bs:(i + 1) * bs]:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Gives a waiting sequence blocks for all its tokens, reusing cached ones; False if too few are free."""
        assert not seq.block_table
        if self.state_slots is not None and not self.state_slots.num_free_slots:
            return False
        hits = self._cached_prefix(seq)
        cached_end = len(hits) * self.block_size
        if self.state_slots is not None:
            hits = self._resumable(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(seq.num_target_tokens) - len(hits)
        if new + revived > self.num_free_blocks:
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(new)]
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens
        if self.state_slots is not None:
            self.state_slots.allocate(seq, self.blocks[hits[-1]].hash if hits else None, cached_end)
        return True

    def _resumable(self, hits: list[int]) -> list[int]:
        """Hits cut back to the deepest block a state snapshot ends on: a recurrent state resumes nowhere else."""
        for n in range(len(hits), 0, -1):
            if self.state_slots.has_snapshot(self.blocks[hits[n - 1]].hash):
                return hits[:n]
        return []

    def next_snapshot(self, seq: Sequence) -> int | None:
        """Where seq's chunk must end for its state to be saved (the scheduler cuts there), if anywhere."""
        if self.state_slots is None or not self.enable_prefix_caching:
            return None
        return self.state_slots.next_snapshot(seq)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
            if self.state_slots is not None:
                self.state_slots.forget(block.hash)
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block_id

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int):
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        seq.block_table.extend(self._take_free_block() for _ in range(needed))

    def free_sequence(self, seq: Sequence):
        self.release_blocks(reversed(seq.block_table))
        seq.block_table = []
        seq.num_hashed_blocks = 0
        if self.state_slots is not None:
            self.state_slots.free(seq)

    def hold_blocks(self, block_ids: list[int]):
        """Another reference to blocks in use (a KV transfer reading or writing them), so they outlive their
        sequence."""
        for block_id in block_ids:
            assert self.blocks[block_id].ref_count > 0, f"block {block_id} is free"
            self.blocks[block_id].ref_count += 1

    def release_blocks(self, block_ids: Iterable[int]):
        """Drops one reference to each block; blocks nothing refers to any more become free, with their contents
        kept until reallocated (those given first are reallocated first)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None

    def register_computed_blocks(self, seq: Sequence):
        """Makes seq's newly completed full blocks findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        bs = self.block_size
        start = seq.num_hashed_blocks
        previous = self.blocks[seq.block_table[start - 1]].hash if start else None
        for i, h in self._hash_chain(seq, full, start, previous):
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, seq.token_ids[i * bs:(i + 1) * bs]
            self.hash_to_block.setdefault(h, block.block_id)
        seq.num_hashed_blocks = full
        if self.state_slots is not None and self.state_slots.is_snapshot_position(seq):
            self.state_slots.save(seq, self.blocks[seq.block_table[full - 1]].hash)
