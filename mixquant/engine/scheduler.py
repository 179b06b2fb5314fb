"""Continuous batching with chunked prefill under a token budget; preemption by recompute.

The scheduler only decides how many of each sequence's uncomputed tokens run this step. Which precision each
of those tokens runs in follows from its position (config.phase_of_position), so a step may hold decode
tokens of running sequences and prefill chunks of new ones together. A chunk ends where the sequence's recurrent
state is to be saved for prefix caching (models with Gated DeltaNet layers), since a state exists only where a step
ends.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from mixquant.config import EngineConfig
from mixquant.engine.block_manager import BlockManager
from mixquant.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    # admitted sequences whose prompt KV a prefill instance holds: being read (WAITING_FOR_REMOTE_KV), or found
    # in the local prefix cache and running
    remote_prefills: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []  # WAITING_FOR_REMOTE_KV: skipped until their blocks have been read
        # prefill-only sequences (remote_decode) whose KV is complete: the engine hands them to the KV connector
        self.finished_prefills: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._num_new_tokens(seq, budget)
            while not self.block_manager.can_append(seq, n):
                victim = self.running.pop()  # the newest loses its blocks first
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq, n)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        # New sequences wait while running ones are being preempted, so the two do not evict each other in turn.
        while (self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.max_num_seqs
               and not preempted):
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq, budget):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:  # its first admission: the queue time ends here
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.first_scheduled_time = time.monotonic()
            if seq.remote_prefill is not None:
                batch.remote_prefills.append(seq)
                if seq.num_computed_tokens < seq.remote_prefill.num_tokens:
                    seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
                    self.loading.append(seq)
                    continue
            n = self._num_new_tokens(seq, budget)
            if n == 0:  # a one-token prompt on a prefill instance: no KV to compute
                seq.status = SequenceStatus.RUNNING
                self.finished_prefills.append(seq)
                continue
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed_tokens, budget)
        snapshot = self.block_manager.next_snapshot(seq)
        return n if snapshot is None else min(n, snapshot - seq.num_computed_tokens)

    def loaded(self, seq: Sequence):
        """Its blocks have been read: it runs from the next step on."""
        self.loading.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def requeue(self, seq: Sequence):
        """Back to the head of the queue with no blocks, to compute its prompt here (its KV could not be read)."""
        self.loading.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence):
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.num_imported_tokens = 0  # what it recomputes is this engine's own KV
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence):
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free_sequence(seq)
        for queue in (self.running, self.waiting, self.loading, self.finished_prefills):
            if seq in queue:
                queue.remove(seq)
                return

    def computed(self, batch: ScheduledBatch):
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_computed_blocks(seq)
            if seq.remote_decode and seq.num_uncomputed_tokens == 0:
                self.running.remove(seq)
                self.finished_prefills.append(seq)
