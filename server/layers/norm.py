"""RMSNorm, with the residual add fused into the same call (one Triton kernel on CUDA)."""
from __future__ import annotations

import torch
from torch import nn

from server.kernels.quant_reference import finish_sums
from server.kernels.reference import rmsnorm_reference

try:
    from server.kernels.norm import rmsnorm as rmsnorm_kernel
except ImportError:  # pragma: no cover - no triton: the CPU path only
    rmsnorm_kernel = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise `x`; with `residual`, normalise `x + residual` and return the sum too. x may
        be deferred sums (int64, kernels/int4_gemv.py), read in the weight's dtype and set to zero."""
        if x.is_cuda and rmsnorm_kernel is not None:
            return rmsnorm_kernel(x, self.weight, self.eps, residual, dtype=self.weight.dtype)
        if x.dtype == torch.int64:
            x = finish_sums(x, self.weight.dtype)
        return rmsnorm_reference(x, self.weight, self.eps, residual)
