"""SiLU-and-multiply over the fused gate/up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [num_tokens, 2 * intermediate] -> 2 x [.., intermediate]
        return F.silu(gate) * up
