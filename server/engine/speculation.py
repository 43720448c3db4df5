"""Speculative decoding's proposals, and how many tokens to propose.

A proposer answers `propose(seqs, counts)` with up to `counts[i]` tokens for each sequence:
n-gram prompt lookup here (TGI's `--speculate` without Medusa heads), Medusa heads' picks here
(their heads in server/models/medusa.py), a draft model in draft_model.py. The last n tokens of a sequence (n from `max_n` down to `min_n`) are looked for earlier in its
prompt and output; the tokens that followed their latest earlier occurrence are proposed. The
engine checks the proposals in one forward pass with the sequence's last token, sampling each
position as it would have without speculation (a row's random key depends on its seed and
position alone, so the picks are the same tokens), and keeps the proposals up to the first
that differs from the pick at its place, plus that pick: the output is the one the sequence
would have had without speculation.
"""
from __future__ import annotations

from server.engine.sequence import Sequence


def propose_ngram(token_ids: list[int], count: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to `count` tokens that followed the latest earlier occurrence of the sequence's last
    n tokens, for the largest n in [min_n, max_n] that occurs; none if none does. (A scan:
    the reference that `NgramIndex` answers the same as.)"""
    if count <= 0:
        return []
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = token_ids[length - n:]
        first = tail[0]
        for start in range(length - n - 1, -1, -1):  # latest first; the tail itself excluded
            if token_ids[start] == first and token_ids[start:start + n] == tail:
                return token_ids[start + n:start + n + count]
    return []


class NgramIndex:
    """`propose_ngram` for one growing sequence, in time independent of its length: for each n,
    where the latest occurrence of each n-gram that some token follows ends, updated as tokens
    are appended (a sequence that shrinks is indexed again)."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0  # tokens whose preceding n-grams are in `ends`

    def propose(self, token_ids: list[int], count: int) -> list[int]:
        if count <= 0:
            return []
        if len(token_ids) < self.indexed:
            self.__init__(self.max_n, self.min_n)
        for t in range(max(self.indexed, 1), len(token_ids)):  # the n-grams that token t follows
            for n, ends in self.ends.items():
                if t >= n:
                    ends[tuple(token_ids[t - n:t])] = t
        self.indexed = len(token_ids)
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self.ends[n].get(tuple(token_ids[length - n:]))
            if end is not None:
                return token_ids[end:end + count]
        return []


class NgramProposer:
    """Proposals by n-gram prompt lookup, from an index that each sequence keeps (`seq.ngrams`)."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], counts: list[int]) -> list[list[int]]:
        proposals = []
        for seq, count in zip(seqs, counts):
            if seq.ngrams is None:
                seq.ngrams = NgramIndex(self.max_n, self.min_n)
            proposals.append(seq.ngrams.propose(seq.token_ids, count))
        return proposals


class MedusaProposer:
    """Proposals from Medusa heads (server/models/medusa.py): their picks at each sequence's
    last accepted place in the step before (`seq.medusa`, which the engine sets from each
    step's results)."""

    def propose(self, seqs: list[Sequence], counts: list[int]) -> list[list[int]]:
        return [seq.medusa[:count] for seq, count in zip(seqs, counts)]


def speculation_depth(speculate: int, num_running: int, max_batch_size: int) -> int:
    """Tokens to propose for each sequence in a step with `num_running` sequences running:
    all `speculate` up to half of `max_batch_size`, half of them (at least one) up to it,
    none above. Checking proposals costs compute that a large batch no longer has to spare
    (its step is bound by compute, not by reading the weights), so speculation steps aside
    there, and the 256-request workload runs as without it.

    The shape of this rule and its default limit (32, `EngineArgs.speculate_max_batch_size`)
    are placeholders TO BE MEASURED on the GPU: the verification step's cost against a decode
    step at each batch size, beside the acceptance rates, decides where it stops paying."""
    if not speculate or num_running > max_batch_size:
        return 0
    if 2 * num_running > max_batch_size:
        return max(1, speculate // 2)
    return speculate
