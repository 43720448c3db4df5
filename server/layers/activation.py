"""SiLU-and-multiply over the fused gate/up projection (one Triton kernel on CUDA)."""
from __future__ import annotations

import torch
from torch import nn

from kernels.reference import silu_and_mul_reference

try:
    from kernels.activation import silu_and_mul
except ImportError:  # pragma: no cover - no triton: the CPU path only
    silu_and_mul = None


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, 2 * intermediate] -> [num_tokens, intermediate]"""
        if x.is_cuda and silu_and_mul is not None:
            return silu_and_mul(x)
        return silu_and_mul_reference(x)
