"""A sparse mixture-of-experts MLP (Mixtral): a router picks the top-k experts of each token,
whose SiLU MLPs run and are summed, weighted by the router's renormalised probabilities.

Under tensor parallelism each expert's intermediate dimension is split across ranks like the
dense MLP's, and the partial outputs are summed by one all-reduce.

`SparseMoE` keeps the experts stacked for the fused kernel (server/kernels/fused_moe.py).
`QuantizedSparseMoE` loads each expert's projections as quantized linear layers (fp8, GPTQ,
AWQ: server/layers/linear.py's schemes, which read the checkpoint's layouts and shard them).
On a GPU, once loaded, each projection's experts are stacked as they are stored
(`fuse_experts`) for the fused quantized kernels (server/kernels/quantized_moe.py), which
dequantize tiles in registers and read nothing back to the host, so decode steps are
captured in CUDA graphs. On the CPU each picked expert runs over its tokens through its own
layers: the reference path, which reads the picked experts on the host.
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from server.config import QuantConfig
from server.kernels.quant_reference import Fp8Experts, Int4Experts, group_of_each_input
from server.kernels.reference import fused_moe_reference
from server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from server.layers.parallel import all_reduce, tensor_parallel

try:
    from server.kernels.fused_moe import fused_moe
    from server.kernels.quantized_moe import quantized_moe
except ImportError:  # pragma: no cover - no triton: the CPU path only
    fused_moe = quantized_moe = None


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
    graph_safe = False  # until the experts are fused: the loop reads which experts run on the host

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 quant: QuantConfig):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)  # router, unquantized
        self.experts = nn.ModuleList(QuantizedExpert(hidden_size, intermediate_size, quant)
                                     for _ in range(num_experts))
        self.w13: Int4Experts | Fp8Experts | None = None  # once fused
        self.w2: Int4Experts | Fp8Experts | None = None

    def finish_loading(self) -> None:
        """On a GPU: finish the experts' layers and fuse them. The model finishes a module
        before its children (server/models/llama.py), and the fused layer has none left."""
        if self.gate.is_cuda and quantized_moe is not None:
            for expert in self.experts:
                expert.w13.finish_loading()
                expert.w2.finish_loading()
            self.fuse_experts()

    def fuse_experts(self) -> None:
        """Stack the loaded experts' quantized tensors for the fused kernels, and drop the
        experts' own layers."""
        self.w13 = stacked([expert.w13 for expert in self.experts])
        self.w2 = stacked([expert.w2 for expert in self.experts])
        del self.experts
        for name, experts in (("w13", self.w13), ("w2", self.w2)):  # the model's parameters count them
            for field in fields(experts):
                tensor = getattr(experts, field.name)
                if isinstance(tensor, torch.Tensor):
                    self.register_parameter(f"{name}_{field.name}", nn.Parameter(tensor, requires_grad=False))
        self.graph_safe = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden] -> [num_tokens, hidden]"""
        weights, experts = route(x, self.gate, self.top_k)
        if self.w13 is not None:
            return all_reduce(quantized_moe(x, self.w13, self.w2, weights, experts))
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for expert in experts.unique().tolist():
            rows, place = (experts == expert).nonzero(as_tuple=True)
            update = self.experts[expert](x[rows]).float() * weights[rows, place, None]
            out.index_add_(0, rows, update)
        return all_reduce(out.to(x.dtype))


def stacked(layers: list[nn.Module]) -> Int4Experts | Fp8Experts:
    """The same projection of every expert (loaded linear layers of one scheme), its tensors
    stacked along a first dimension of experts. An expert whose 4-bit groups are runs, or whose
    inputs kept their order, gets the g_idx or perm that says so where another has its own."""
    first = layers[0]
    if hasattr(first, "weight_scale"):
        return Fp8Experts(torch.stack([layer.weight for layer in layers]),
                          torch.stack([layer.weight_scale for layer in layers]))
    K = first.qweight.shape[0] * 8
    runs = group_of_each_input(K, first.group_size, first.qweight.device).to(torch.int32)
    inputs = torch.arange(K, dtype=torch.int32, device=first.qweight.device)

    def each(name: str, otherwise: torch.Tensor) -> torch.Tensor | None:
        tensors = [getattr(layer, name) for layer in layers]
        if all(t is None for t in tensors):
            return None
        return torch.stack([otherwise if t is None else t.to(torch.int32) for t in tensors])

    return Int4Experts(torch.stack([layer.qweight for layer in layers]), torch.stack([layer.zeros for layer in layers]),
                       torch.stack([layer.scales for layer in layers]), each("g_idx", runs), each("perm", inputs),
                       first.group_size)
