"""SiLU-and-multiply over the fused gate/up projection (one Triton kernel on CUDA)."""
from __future__ import annotations

import torch

from kernels.reference import silu_and_mul_reference

try:
    from kernels.activation import silu_and_mul as silu_and_mul_kernel
except ImportError:  # pragma: no cover - no triton: the CPU path only
    silu_and_mul_kernel = None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * intermediate] = [gate | up] -> silu(gate) * up [num_tokens, intermediate]"""
    if x.is_cuda and silu_and_mul_kernel is not None:
        return silu_and_mul_kernel(x)
    return silu_and_mul_reference(x)
