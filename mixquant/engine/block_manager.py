"""Paged KV blocks with automatic prefix caching of full blocks.

A full block is registered under a hash of (previous block's hash, the precision that wrote it, its tokens).
The precision is part of the key because the phase rule makes KV depend on where a token sat: a block that
held generated (decode-precision) tokens is not what a prompt (prefill-precision) run would have written, so it
is reused only by a sequence that would write it the same way. Hits are verified against the stored tokens.
Freed blocks keep their contents until reallocated, oldest first.

Blocks live in the units of engine/kv_cache.py. A block of the full-attention layers is one unit (its id is the
unit's: `seq.block_table`); in a model with sliding-window layers, the same block of those layers takes
`window_units` more units (`seq.window_table`), held only while some token still to be computed can see the block:
once a sequence is past it, the units go back to the pool (still cached under the block's hash). A prefix hit of n
blocks needs the full layers' n blocks and the sliding layers' blocks within the window before position n * bs.

Models with recurrent layers (Qwen3.5) also hold a state slot per sequence (engine/state_slots.py), taken and given
back with the blocks; their hits are cut back to the deepest block a state snapshot ends on.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import xxhash

from mixquant.config import phase_boundary
from mixquant.engine.kv_cache import peak_units
from mixquant.engine.sequence import Sequence
from mixquant.engine.state_slots import StateSlots
from mixquant.layers.attention import first_window_block


class Block:
    """One unit of the pool, with the cache identity of the block it holds."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "in_window")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] = []
        self.in_window = False  # one of a sliding-window block's units


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
                 decode_precision: str, state_slots: StateSlots | None = None, window: int | None = None,
                 window_units: int = 0):
        """num_blocks units; window / window_units: the sliding-window layers' window and the units one of their
        blocks takes (none without such layers)."""
        self.block_size = block_size
        self.state_slots = state_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.prefill_precision, self.decode_precision = prefill_precision, decode_precision
        self.window, self.window_units = window, window_units
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.hash_to_window_units: dict[int, tuple[int, ...]] = {}
        self.prefix_cache_queries = 0  # tokens looked up, as vLLM counts them
        self.prefix_cache_hits = 0
        self.window_blocks_released = 0  # sliding-window blocks given back while their sequence ran on

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

    def peak_units(self, num_tokens: int, chunk: int) -> int:
        """The most units a sequence of num_tokens computed in chunks of up to `chunk` tokens holds at once."""
        return peak_units(num_tokens, chunk, self.block_size, self.window, self.window_units)

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

    def _first_window_block(self, position: int) -> int:
        return first_window_block(position, self.window, self.block_size)

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[tuple[int, ...] | None]]:
        """Units of seq's leading cached blocks (the last token to compute is never taken from the cache): the full
        layers', and for each of those blocks the sliding layers' (None where they are not cached)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return [], []
        full: list[int] = []
        windows: list[tuple[int, ...] | None] = []
        bs = self.block_size
        for i, h in self._hash_chain(seq, (seq.num_target_tokens - 1) // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            full.append(block_id)
            units = self.hash_to_window_units.get(h)
            windows.append(units if units and self.blocks[units[0]].token_ids == tokens else None)
        return full, windows

    def _hit_length(self, full: list[int], windows: list[tuple[int, ...] | None]) -> int:
        """The longest hit a sequence can resume from: with sliding-window layers, one whose window is cached too
        (the next token sees blocks from _first_window_block(n * bs) on); with recurrent layers, one a state
        snapshot ends on (a recurrent state resumes nowhere else)."""
        n = len(full)
        while n and not self._resumes_after(n, full, windows):
            n -= 1
        return n

    def _resumes_after(self, n: int, full: list[int], windows: list[tuple[int, ...] | None]) -> bool:
        window_cached = not self.window_units or all(windows[self._first_window_block(n * self.block_size):n])
        snapshot = self.state_slots is None or self.state_slots.has_snapshot(self.blocks[full[n - 1]].hash)
        return window_cached and snapshot

    def _window_blocks_missing(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Block indices the sliding layers need for computing positions [start, end) that seq does not hold."""
        if not self.window_units:
            return []
        held = seq.window_table
        return [i for i in range(self._first_window_block(start), self.blocks_needed(end))
                if i >= len(held) or held[i] is None]

    def allocate(self, seq: Sequence, max_new_tokens: int | None = None) -> bool:
        """Gives a waiting sequence blocks for all its tokens, reusing cached ones, and the sliding layers' blocks
        for its first `max_new_tokens` (all by default) tokens to compute; False if too few are free."""
        assert not seq.block_table
        if self.state_slots is not None and not self.state_slots.num_free_slots:
            return False
        full, windows = self._cached_prefix(seq)
        cached_end = len(full) * self.block_size
        n = self._hit_length(full, windows)
        hits = full[:n]
        computed = n * self.block_size
        first = self._first_window_block(computed)
        seq.window_table = [None] * first + windows[first:n] if self.window_units else []
        end = seq.num_target_tokens if max_new_tokens is None else min(seq.num_target_tokens, computed + max_new_tokens)
        window_new = self._window_blocks_missing(seq, computed, end)
        held = hits + [unit for units in seq.window_table if units for unit in units]
        revived = sum(1 for b in held if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(seq.num_target_tokens) - len(hits)
        if new + self.window_units * len(window_new) + revived > self.num_free_blocks:
            seq.window_table = []
            return False
        for block_id in held:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(new)]
        self._take_window_blocks(seq, window_new)
        seq.num_computed_tokens = computed
        seq.num_hashed_blocks = len(hits)
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens
        if self.state_slots is not None:
            self.state_slots.allocate(seq, self.blocks[hits[-1]].hash if hits else None, cached_end)
        return True

    def next_snapshot(self, seq: Sequence) -> int | None:
        """Where seq's chunk must end for its state to be saved (the scheduler cuts there), if anywhere."""
        if self.state_slots is None or not self.enable_prefix_caching:
            return None
        return self.state_slots.next_snapshot(seq)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self._forget(block)
        block.hash, block.token_ids, block.ref_count, block.in_window = None, [], 1, False
        return block_id

    def _forget(self, block: Block):
        """A cached block loses one of its units to a new owner: the block is no longer in the cache."""
        if not block.in_window:
            if self.hash_to_block.get(block.hash) == block.block_id:
                del self.hash_to_block[block.hash]
                if self.state_slots is not None:
                    self.state_slots.forget(block.hash)
            return
        units = self.hash_to_window_units.get(block.hash)
        if units and block.block_id in units:
            del self.hash_to_window_units[block.hash]
            for unit in units:  # the block's other units: free (they were freed with it), no longer cached
                if unit != block.block_id:
                    self.blocks[unit].hash, self.blocks[unit].token_ids = None, []

    def _take_window_blocks(self, seq: Sequence, indices: list[int]):
        for i in indices:
            units = tuple(self._take_free_block() for _ in range(self.window_units))
            for unit in units:
                self.blocks[unit].in_window = True
            if i >= len(seq.window_table):
                seq.window_table.extend([None] * (i + 1 - len(seq.window_table)))
            seq.window_table[i] = units

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        end = seq.num_computed_tokens + num_new_tokens
        needed = (max(0, self.blocks_needed(end) - len(seq.block_table))  # a prompt's blocks came at admission
                  + self.window_units * len(self._window_blocks_missing(seq, seq.num_computed_tokens, end)))
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int):
        end = seq.num_computed_tokens + num_new_tokens
        seq.block_table.extend(self._take_free_block() for _ in range(self.blocks_needed(end) - len(seq.block_table)))
        self._take_window_blocks(seq, self._window_blocks_missing(seq, seq.num_computed_tokens, end))

    def free_sequence(self, seq: Sequence):
        self.release_blocks(reversed(seq.block_table))
        self.release_blocks(unit for units in reversed(seq.window_table) if units for unit in units)
        seq.block_table, seq.window_table = [], []
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
        """Makes seq's newly completed full blocks findable by later sequences; gives back the sliding layers'
        blocks that no token of seq still to be computed can see."""
        if self.enable_prefix_caching:
            self._register(seq)
        if self.window_units:
            first = self._first_window_block(seq.num_computed_tokens)
            past = [i for i, units in enumerate(seq.window_table[:first]) if units]
            for i in past:
                self.release_blocks(seq.window_table[i])
                seq.window_table[i] = None
            self.window_blocks_released += len(past)

    def _register(self, seq: Sequence):
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        bs = self.block_size
        start = seq.num_hashed_blocks
        previous = self.blocks[seq.block_table[start - 1]].hash if start else None
        for i, h in self._hash_chain(seq, full, start, previous):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.hash_to_block.setdefault(h, block.block_id)
            units = seq.window_table[i] if i < len(seq.window_table) else None
            if units:
                for unit in units:
                    self.blocks[unit].hash, self.blocks[unit].token_ids = h, tokens
                self.hash_to_window_units.setdefault(h, units)
        seq.num_hashed_blocks = full
        if self.state_slots is not None and self.state_slots.is_snapshot_position(seq):
            self.state_slots.save(seq, self.blocks[seq.block_table[full - 1]].hash)
