"""Scheduler: continuous batching over waiting and running queues, with a per-step token budget
(chunked prefill), prefix-cache lookups on admission, and preemption by recompute. A sequence with Medusa drafts
verifies their tree where its rows fit the step's budget and the free blocks, else decodes plainly: speculation
never preempts another sequence."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work, one forward: seqs[i] computes its next num_new_tokens[i] tokens; each of tree_seqs verifies
    its Medusa tree (engine.medusa) in the same forward, under a mask of its own."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    tree_seqs: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Does seqs[i] reach its last token this step, and so sample the next one?"""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq)


class Scheduler:
    """Invariant: every running sequence holds blocks for all its computed tokens; waiting ones hold none
    unless they are mid-admission."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            tree_size = seq.draft_tree.tree.size if seq.draft_token_ids is not None else 0
            # a tree is verified where its rows fit the budget and free blocks: drafts never preempt another sequence
            verifies_tree = (tree_size and len(seq) - seq.num_computed_tokens == 1 and budget >= tree_size
                             and self.block_manager.allocate(seq, seq.num_computed_tokens + tree_size))
            n = tree_size if verifies_tree else min(len(seq) - seq.num_computed_tokens, budget)
            if verifies_tree or self._reserve_or_preempt(seq, n):
                if verifies_tree:
                    batch.tree_seqs.append(seq)
                else:
                    batch.seqs.append(seq)
                    batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        # the prompt blocks running sequences are still to compute: a request whose next block is one of them (n
        # choices of a prompt, a burst sharing a system prompt) waits to find it in the prefix cache, not compute it
        pending_of = self.block_manager.pending_block_hash
        in_flight = {h for s in self.running if (h := pending_of(s, s.cache_key)) is not None}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                seq.num_computed_tokens = self.block_manager.match_prefix(seq, seq.cache_key)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
            pending = pending_of(seq, seq.cache_key)
            if pending is not None and pending in in_flight:
                self._release(seq)
                break
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                self._release(seq)
                break
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if pending is not None:
                in_flight.add(pending)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _reserve_or_preempt(self, seq: Sequence, n: int) -> bool:
        """Make room for seq's next n tokens, preempting the newest running sequences if blocks run
        out. False if seq itself had to be preempted."""
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        # recompute later: its tokens are kept, its K/V is dropped (the prefix cache may still hold it)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (finished, stopped or aborted) and return its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
