"""RMSNorm, with the residual add fused into the same call (as the fast kernels will do)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 and cast back before the weight, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise `x`; with `residual`, normalise `x + residual` and return the sum too."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
