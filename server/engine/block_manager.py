"""The KV block manager: fixed-size blocks, reference counts, and prefix caching.

A block is keyed by a hash chained over the token ids of every block before it (rooted in the
request's LoRA adapter), so two sequences share a block exactly when their token prefixes up
to that block, and their adapters, are equal. Blocks
that no sequence uses stay cached in a free list ordered least-recently-used first: they are
handed out again (and forgotten by the cache) only when no never-cached block is left first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from server.engine.sequence import Sequence


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id holding those tokens' K/V
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_hits = 0  # tokens served from the prefix cache, for stats and tests

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, seq: Sequence) -> list[bytes]:
        """Hashes of every full block of `seq`'s tokens (extends `seq.block_hashes`)."""
        size = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), len(seq.token_ids) // size):
            parent = hashes[-1] if hashes else seq.request.cache_salt
            hashes.append(chain_hash(parent, seq.token_ids[i * size:(i + 1) * size]))
        return hashes

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`'s tokens (not yet claimed).

        The last token is always left to compute, since its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for block_hash in self._full_block_hashes(seq):
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        if hits and len(hits) * self.block_size >= len(seq):
            hits.pop()
        return hits

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether blocks for `num_tokens` tokens can be had, reusing the cached `hits`."""
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(hits) + reclaimed <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        """Give a waiting `seq` its cached prefix and fresh blocks up to `num_tokens`."""
        assert not seq.block_table
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = array("q", hits)
        seq.num_committed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_hits += seq.num_computed_tokens
        self.grow(seq, num_tokens)

    def holds(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq`'s blocks already hold `num_tokens` tokens (most decode steps)."""
        return num_tokens <= len(seq.block_table) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend `seq`'s block table to hold `num_tokens` tokens."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        old_hash = self.block_hash[block]
        if old_hash is not None:
            if self.cached.get(old_hash) == block:
                del self.cached[old_hash]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def commit(self, seq: Sequence) -> None:
        """Publish `seq`'s fully computed blocks to the prefix cache (those whose token ids
        are all known: a pending token's block waits)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_committed_blocks:  # most steps: no block completed
            return
        hashes = self._full_block_hashes(seq)
        for i in range(seq.num_committed_blocks, num_full):
            block = seq.block_table[i]
            if self.block_hash[block] is None:
                self.block_hash[block] = hashes[i]
                self.cached.setdefault(hashes[i], block)
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its blocks stay cached until reused, tail blocks first."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = array("q")
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0
