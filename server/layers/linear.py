"""Linear layers, sharded over the tensor-parallel ranks, loading only their own slices.

`MergedColumnParallelLinear` splits the output rows across ranks (no communication) and
stacks several checkpoint matrices (q, k, v; or gate, up) so that one matmul computes them
all; `RowParallelLinear` splits the input columns and sums the partial products with an
all-reduce. Each piece of a merged matrix is cut into its own number of parts (k and v into as many as there are KV heads, when there are fewer than ranks, so those
heads are replicated). Checkpoint tensors arrive as anything sliceable (a tensor, or a lazy
safetensors slice that reads only the rows asked for).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.parallel import all_reduce, tensor_parallel


class MergedColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, pieces: list[tuple[int, int]], bias: bool = False):
        """`pieces`: (rows in the checkpoint, parts it is cut into) for each stacked matrix."""
        super().__init__()
        tp = tensor_parallel()
        self.shares = [tp.part(rows, parts) for rows, parts in pieces]  # (start, length) each
        self.offsets = [sum(length for _, length in self.shares[:i]) for i in range(len(pieces) + 1)]
        self.weight = nn.Parameter(torch.empty(self.offsets[-1], in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.offsets[-1]), requires_grad=False) if bias else None

    def load_piece(self, index: int, loaded, bias: bool = False) -> None:
        target = self.bias if bias else self.weight
        start, length = self.shares[index]
        target.data[self.offsets[index]:self.offsets[index + 1]].copy_(loaded[start:start + length])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.start, local = tensor_parallel().part(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, loaded, bias: bool = False) -> None:
        if bias:
            self.bias.data.copy_(loaded[:])
        else:
            self.weight.data.copy_(loaded[:, self.start:self.start + self.weight.shape[1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out
