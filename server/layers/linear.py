"""Linear layers whose weights are loaded piece by piece from a checkpoint.

A `MergedLinear` stacks several checkpoint matrices (q, k, v; or gate, up) along the output
dimension so that one matmul computes them all; each piece is copied in by its index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]

    def load_piece(self, index: int, tensor: torch.Tensor, bias: bool = False) -> None:
        target = self.bias if bias else self.weight
        start, end = self.offsets[index], self.offsets[index + 1]
        target.data[start:end].copy_(tensor)
