"""Continuous batching: which sequences run in the next step, and for how many tokens.

Every step, running sequences go first (one token each when decoding, a chunk when their
prefill is still in progress), then waiting sequences are admitted first come, first served
while the prefill token budget and the KV blocks last; a prompt longer than the budget is
prefilled in chunks over several steps. With TGI's `waiting_served_ratio`, prompts join a batch
that is decoding only in groups: once at least that ratio times the running sequences could be
admitted, or `max_waiting_tokens` steps after the last admission (0, the default: whenever
there is room). When blocks run out, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (usually from the prefix
cache) later. Nothing here touches a tensor.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.config import SchedulerConfig
from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


RECOVERY_STEPS = 64


@dataclass
class ScheduledBatch:
    """The work of one step: `num_new_tokens[i]` tokens of `seqs[i]`, from its computed mark."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: newest last
        self.num_preemptions = 0
        # After a step ran out of device memory, the batch is held at the size that fits
        # until RECOVERY_STEPS steps have gone well.
        self.memory_limit: int | None = None
        self._steps_since_limit = 0
        # After a failed step, the engine names one request to run alone (`Request`); the
        # others keep their blocks and wait.
        self.isolated = None
        self._steps_since_admission = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_batch_prefill_tokens
        queue = deque(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            # Nothing to compute (its pending token finishes it), or another request runs alone.
            if seq.pending_is_last or not self._may_run(seq):
                kept.append(seq)
                continue
            remaining = len(seq) - seq.num_computed_tokens
            # Decoding: its last token, and the tokens proposed after it, if any.
            num_tokens = 1 + len(seq.drafts) if remaining == 1 else min(remaining, budget)
            if num_tokens == 0:  # a chunked prefill waiting for budget
                kept.append(seq)
                continue
            total = seq.num_computed_tokens + num_tokens
            if not self.block_manager.holds(seq, total):
                while not self.block_manager.can_grow(seq, total) and queue:
                    self._preempt(queue.pop(), batch)
                if not self.block_manager.can_grow(seq, total):
                    self._preempt(seq, batch)
                    continue
                self.block_manager.grow(seq, total)
            batch.add(seq, num_tokens)
            kept.append(seq)
            if remaining > 1:
                budget -= num_tokens
        self.running = kept
        if not batch.preempted and self.waiting:
            admitted = self._admits_now() and self._admit_waiting(batch, budget)
            self._steps_since_admission = 0 if admitted else self._steps_since_admission + 1
        return batch

    def _limit(self) -> int:
        return min(self.config.max_num_seqs, self.memory_limit or self.config.max_num_seqs)

    def _admits_now(self) -> bool:
        """TGI's rule: a batch that is decoding takes prompts once at least waiting_served_ratio
        times its size could join it (as many as wait, up to the free places), or after
        max_waiting_tokens steps without taking any."""
        ratio = self.config.waiting_served_ratio
        if ratio <= 0 or not self.running or self._steps_since_admission >= self.config.max_waiting_tokens:
            return True
        return min(len(self.waiting), self._limit() - len(self.running)) >= int(len(self.running) * ratio)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> bool:
        """Admit what fits, first come first served; whether any was admitted."""
        deferred, admitted = [], False
        limit = self._limit()
        while self.waiting and budget > 0 and len(self.running) < limit:
            seq = self.waiting[0]
            if _waits_for_first_sample(seq) or not self._may_run(seq):
                deferred.append(self.waiting.popleft())
                continue
            needs_prompt_logprobs = seq.params.prompt_logprobs is not None
            hits = [] if needs_prompt_logprobs else self.block_manager.lookup_prefix(seq)
            cached = len(hits) * self.block_manager.block_size
            num_tokens = min(len(seq) - cached, budget)
            if not self.block_manager.can_admit(hits, cached + num_tokens):
                break
            self.waiting.popleft()
            self.block_manager.admit(seq, hits, cached + num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_tokens)
            budget -= num_tokens
            admitted = True
        self.waiting.extendleft(reversed(deferred))
        return admitted

    def preempt_newest(self, count: int) -> None:
        """After a step that ran out of device memory: send the `count` newest running
        sequences back to the queue and admit no more than remain, for a while."""
        for _ in range(min(count, len(self.running))):
            self._preempt(self.running.pop(), ScheduledBatch())
        self.memory_limit = max(1, len(self.running))
        self._steps_since_limit = 0

    def requeue_running(self) -> None:
        """Send every running sequence back to the front of the queue, in admission order, to be
        recomputed (after a failed step, whose work is dropped)."""
        while self.running:
            self._preempt(self.running.pop(), ScheduledBatch())

    def _may_run(self, seq: Sequence) -> bool:
        return self.isolated is None or seq.request is self.isolated

    def step_succeeded(self) -> None:
        if self.memory_limit is not None:
            self._steps_since_limit += 1
            if self._steps_since_limit >= RECOVERY_STEPS:
                self.memory_limit = None

    def _release(self, seq: Sequence) -> None:
        self.block_manager.release(seq)
        if seq.draft_cache is not None:  # a draft model's blocks go with the sequence's
            seq.draft_cache.release()

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self._release(seq)
        seq.drafts = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1


def _waits_for_first_sample(seq: Sequence) -> bool:
    """The other samples of a request (`n`, `best_of`) start once the first has its prompt in
    the cache, so that they read it from the prefix cache instead of computing it again."""
    first = seq.request.sequences[0]
    return seq is not first and not first.is_finished and \
        first.num_computed_tokens < first.num_prompt_tokens
