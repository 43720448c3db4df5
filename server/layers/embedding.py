"""Token embedding and the LM head, split over the vocabulary across tensor-parallel ranks
(the head may share the embedding's matrix). Each rank holds a contiguous range of rows,
padded so that every rank holds as many."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.linear import dense_linear
from server.layers.parallel import all_gather_last_dim, all_reduce, tensor_parallel


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = tensor_parallel()
        self.vocab_size = vocab_size
        per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * per_rank
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size), requires_grad=False)
        self.sharded = tp.size > 1

    def load(self, loaded, name: str = "weight") -> None:
        if name != "weight":
            raise ValueError(f"unexpected tensor {name!r} in an embedding")
        rows = max(0, min(self.weight.shape[0], self.vocab_size - self.start))
        self.weight.data[:rows].copy_(loaded[self.start:self.start + rows])

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1)
        return all_reduce(out)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Embedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        if tied_to is None:
            self.embedding = Embedding(vocab_size, hidden_size)  # the same row split
            self.weight = self.embedding.weight
        else:
            self.embedding = None
            self.weight = tied_to.weight

    def load(self, loaded, name: str = "weight") -> None:
        self.embedding.load(loaded, name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(dense_linear(hidden, self.weight))
        return logits[..., :self.vocab_size]  # [num_tokens, vocab]
