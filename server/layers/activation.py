"""SiLU-and-multiply over the fused gate/up projection (one Triton kernel on CUDA)."""
from __future__ import annotations

import torch

from server.kernels.quant_reference import finish_sums
from server.kernels.reference import silu_and_mul_reference

try:
    from server.kernels.activation import silu_and_mul as silu_and_mul_kernel
except ImportError:  # pragma: no cover - no triton: the CPU path only
    silu_and_mul_kernel = None


def silu_and_mul(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[num_tokens, 2 * intermediate] = [gate | up] -> silu(gate) * up [num_tokens, intermediate];
    x may be deferred sums (int64, kernels/int4_gemv.py), read in `dtype` and set to zero."""
    if x.is_cuda and silu_and_mul_kernel is not None:
        return silu_and_mul_kernel(x, dtype)
    return silu_and_mul_reference(finish_sums(x, dtype) if x.dtype == torch.int64 else x)
