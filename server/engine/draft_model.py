"""Speculative decoding's proposals from a draft model: a smaller model of the same vocabulary,
run greedily with its own model runner and paged KV cache.

Each step, for each sequence that speculates, the draft first catches up on the sequence's
tokens that its cache does not hold yet (its own prefill, chunked under the same token budget
as the target's; a sequence still catching up proposes nothing this step) and picks the token
after the last one; then it runs one-token steps, each fed the pick before it on the device,
until it has proposed its count. Its cache then holds the fed proposals too. What the target
rejected is forgotten before the next step: the draft's cache is valid only as far as the
target's (`seq.num_computed_tokens` counts the tokens whose K/V the target kept), and the
places after that are simply written again.

The draft's blocks are its own (no prefix caching): a sequence's are freed with its target
blocks (`Scheduler` releases `seq.draft_cache` wherever it releases the sequence: finished,
aborted, preempted). When the draft's cache is full, a sequence proposes nothing; when the
device runs out of memory drafting, no sequence does that step.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence
from server.engine.tokenizer import Tokenizer
from server.runtime.model_runner import LaunchedStep, ModelRunner, SequenceChunk
from server.runtime.sampler import SamplingOptions


@dataclass
class DraftCache:
    """A sequence's place in the draft model's KV cache: the fields of a sequence that a
    `BlockManager` reads and writes, so that the draft's manager keeps it as it keeps those."""

    blocks: BlockManager
    block_table: array = field(default_factory=lambda: array("q"))
    num_computed_tokens: int = 0  # tokens whose draft K/V are in the cache
    num_committed_blocks: int = 0

    def release(self) -> None:
        self.blocks.release(self)


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, target_vocab: int, draft_vocab: int,
                          draft_name: str) -> None:
    """Refuse a draft model whose token ids mean other tokens than the target's."""
    if target_vocab != draft_vocab or target.token_bytes() != draft.token_bytes():
        raise ValueError(f"the draft model {draft_name!r} has another vocabulary than the model "
                         f"({draft_vocab} token ids against {target_vocab}, or other tokens for them): "
                         "speculative decoding needs a draft model with the same tokenizer")


class DraftModelProposer:
    """Up to `counts[i]` greedy tokens of the draft model for each sequence (see above)."""

    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int, max_batch_prefill_tokens: int,
                 max_model_len: int):
        self.runner = runner
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.max_model_len = max_model_len  # the draft's: positions past it get no proposals

    def propose(self, seqs: list[Sequence], counts: list[int]) -> list[list[int]]:
        try:
            return self._propose(seqs, counts)
        except torch.cuda.OutOfMemoryError:
            # Proposals are optional: this step checks none, and the draft starts these sequences over.
            for seq in seqs:
                seq.draft_cache.release()
            torch.cuda.empty_cache()
            return [[] for _ in seqs]

    def _propose(self, seqs: list[Sequence], counts: list[int]) -> list[list[int]]:
        counts = [min(count, self.max_model_len - len(seq.token_ids) + 1) for seq, count in zip(seqs, counts)]
        proposals: list[list[int]] = [[] for _ in seqs]
        rows, launched = self._catch_up(seqs, counts)  # rows: seq index -> its row among the picks
        if not rows:
            return proposals
        # One-token steps, each fed the picks of the step before on the device; a step is read
        # back once the next one is queued, so that the device does not wait for the host.
        steps = []  # (rows, results) of each step read back
        for step in range(1, max(counts[i] for i in rows)):
            going = [i for i in rows if counts[i] > step]
            chunks = [SequenceChunk([0], len(seqs[i].token_ids) + step - 1, seqs[i].draft_cache.block_table,
                                    sampling=SamplingOptions(), pending_row=rows[i]) for i in going]
            following = self.runner.sample(self.runner.forward(chunks, launched))
            steps.append((rows, self.runner.collect(launched)))
            rows, launched = {i: row for row, i in enumerate(going)}, following
        steps.append((rows, self.runner.collect(launched)))
        for rows, results in steps:
            picks = [result.sampled.token_id for result in results if result.sampled is not None]
            for i, row in rows.items():
                proposals[i].append(picks[row])
        for i in steps[0][0]:
            seqs[i].draft_cache.num_computed_tokens = len(seqs[i].token_ids) + len(proposals[i]) - 1
        return proposals

    def _catch_up(self, seqs: list[Sequence], counts: list[int]) -> tuple[dict[int, int], LaunchedStep | None]:
        """Queue the step that computes what each sequence's draft cache lacks, under the token
        budget (the sequences with the least to catch up first), and picks the first proposal
        of each it brings up to date; their rows among its picks, and the step."""
        for seq in seqs:
            if seq.draft_cache is None:
                seq.draft_cache = DraftCache(self.blocks)
            cache = seq.draft_cache  # valid only as far as the target's: its rejected places are stale
            cache.num_computed_tokens = min(cache.num_computed_tokens, seq.num_computed_tokens)
        budget = self.max_batch_prefill_tokens
        chunks, rows = [], {}
        missing = [len(seq.token_ids) - seq.draft_cache.num_computed_tokens for seq in seqs]
        for i in sorted(range(len(seqs)), key=missing.__getitem__):
            seq, cache = seqs[i], seqs[i].draft_cache
            start = cache.num_computed_tokens
            take = min(missing[i], budget)
            if counts[i] <= 0 or take <= 0:
                continue
            # with the places of the proposals it feeds: all but the last
            needed = start + take + (counts[i] - 1 if take == missing[i] else 0)
            if not self.blocks.can_grow(cache, needed):
                continue
            self.blocks.grow(cache, needed)
            chunk = SequenceChunk(seq.token_ids[start:start + take], start, cache.block_table)
            cache.num_computed_tokens = start + take
            if take == missing[i]:
                chunk.sampling = SamplingOptions()  # greedy
                rows[i] = len(rows)
            if missing[i] > 1:
                budget -= take
            chunks.append(chunk)
        return rows, self.runner.sample(self.runner.forward(chunks)) if chunks else None
