"""A sparse mixture-of-experts MLP (Mixtral): a router picks the top-k experts of each token,
whose SiLU MLPs run and are summed, weighted by the router's renormalised probabilities.

Under tensor parallelism each expert's intermediate dimension is split across ranks like the
dense MLP's, and the partial outputs are summed by one all-reduce.

`SparseMoE` keeps the experts stacked for the fused kernel (server/kernels/fused_moe.py).
`QuantizedSparseMoE` keeps each expert's projections as quantized linear layers (fp8, GPTQ,
AWQ: server/layers/linear.py's schemes, which read the checkpoint's layouts and shard them),
and runs each picked expert over its tokens: no dequantized copy of an expert is made on a
GPU, but the loop reads which experts were picked on the host, so its steps run eagerly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.config import QuantConfig
from server.kernels.reference import fused_moe_reference
from server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
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
        weights, experts = route(x, self.gate, self.top_k)
        if x.is_cuda and fused_moe is not None:
            out = fused_moe(x, self.w13, self.w2, weights, experts)
        else:
            out = fused_moe_reference(x, self.w13, self.w2, weights, experts)
        return all_reduce(out)


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [tokens, k] and their renormalised weights [tokens, k]."""
    probs = F.linear(x, gate).float().softmax(dim=-1)  # [num_tokens, experts]
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


class QuantizedExpert(nn.Module):
    """One expert's gate/up (w1, w3) and down (w2) projections, quantized as a dense MLP's."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant: QuantConfig):
        super().__init__()
        parts = tensor_parallel().size
        self.w13 = MergedColumnParallelLinear(hidden_size, [(intermediate_size, parts)] * 2, quant=quant)
        self.w2 = RowParallelLinear(intermediate_size, hidden_size, quant=quant, gated=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the expert's output: the layer sums the ranks' once, for all experts."""
        return self.w2.scheme.apply(self.w2, self.w13(x), None, gated=True)


class QuantizedSparseMoE(nn.Module):
    graph_safe = False  # which experts run is read on the host each step

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 quant: QuantConfig):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)  # router, unquantized
        self.experts = nn.ModuleList(QuantizedExpert(hidden_size, intermediate_size, quant)
                                     for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]"""
        weights, experts = route(x, self.gate, self.top_k)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for expert in experts.unique().tolist():
            rows, place = (experts == expert).nonzero(as_tuple=True)
            update = self.experts[expert](x[rows]).float() * weights[rows, place, None]
            out.index_add_(0, rows, update)
        return all_reduce(out.to(x.dtype))
