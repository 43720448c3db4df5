"""A sparse mixture-of-experts MLP (Mixtral): a router picks the top-k experts of each token,
whose SiLU MLPs run and are summed, weighted by the router's renormalised probabilities.

Under tensor parallelism each expert's intermediate dimension is split across ranks like the
dense MLP's, and the partial outputs are summed by one all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.reference import fused_moe_reference
from server.layers.parallel import all_reduce, tensor_parallel

try:
    from server.kernels.fused_moe import fused_moe
except ImportError:  # pragma: no cover - no triton: the CPU path only
    fused_moe = None


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.start, local = tensor_parallel().part(intermediate_size)
        self.gate = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)  # router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, local), requires_grad=False)

    def load_expert(self, expert: int, which: str, loaded) -> None:
        """Checkpoint matrices w1 (gate), w3 (up) [inter, hidden] and w2 (down) [hidden, inter]."""
        local = self.w2.shape[2]
        if which == "w1":
            self.w13.data[expert, :local].copy_(loaded[self.start:self.start + local])
        elif which == "w3":
            self.w13.data[expert, local:].copy_(loaded[self.start:self.start + local])
        else:
            self.w2.data[expert].copy_(loaded[:, self.start:self.start + local])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]"""
        probs = F.linear(x, self.gate).float().softmax(dim=-1)  # [num_tokens, experts]
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if x.is_cuda and fused_moe is not None:
            out = fused_moe(x, self.w13, self.w2, weights, experts)
        else:
            out = fused_moe_reference(x, self.w13, self.w2, weights, experts)
        return all_reduce(out)
