"""Linear layers, sharded over the tensor-parallel ranks, loading only their own slices.

`MergedColumnParallelLinear` splits the output rows across ranks (no communication) and
stacks several checkpoint matrices (q, k, v; or gate, up) so that one matmul computes them
all; `RowParallelLinear` splits the input columns and sums the partial products with an
all-reduce. Each piece of a merged matrix is cut into its own number of parts (k and v into as many as there are KV heads, when there are fewer than ranks, so those
heads are replicated). Checkpoint tensors arrive as anything sliceable (a tensor, or a lazy
safetensors slice that reads only the rows asked for).

How a layer holds and multiplies its weight is its scheme, chosen by the quantization config:
`DenseWeight` (the model dtype), `Fp8Weight` or `Int4Weight` (AWQ and GPTQ). A scheme
registers its tensors on the layer under their checkpoint names, reads a rank's slice of each
(`out_cut`: the outputs of a column-parallel piece, `in_cut`: the inputs of a row-parallel
rank, both in units of weight rows and columns; `rows`: where the piece's outputs go in the
layer), turns them into what it multiplies with once all are read (`finish`), and applies them.

A dense weight (and the LM head's) multiplies a decode batch of at most 16 rows on
CUDA with server/kernels/gemv.py: it reads the weight faster than cuBLAS's matrix-vector products
(on an H100, for each Mistral-7B weight at 1-16 rows; docs/kernels.md has the figures).

A `RowParallelLinear(gated=True)` (the MLP's down_proj) takes the gate/up projection's output
[gate | up] and multiplies silu(gate) * up: inside the gemv kernel where it runs, else first
(`silu_and_mul`), so that a decode step's layer has one launch fewer.

`deferred=True` tells a layer that what reads its output (the norm, silu_and_mul, the rotary
embedding) also takes a 4-bit product's deferred sums (int64; server/layers/int4_linear.py);
other schemes ignore it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.config import QuantConfig
from server.layers.activation import silu_and_mul
from server.layers.fp8_linear import Fp8Weight
from server.layers.int4_linear import Int4Weight
from server.layers.lora import LoRASlots
from server.layers.parallel import all_reduce, read_shard, tensor_parallel

try:
    from server.kernels.gemv import gemv, suits
except ImportError:  # pragma: no cover - no triton: the CPU path only
    gemv = suits = None
if TYPE_CHECKING:
    from server.kernels.lora import LoRAUpdate


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 gated: bool = False, lora: LoRAUpdate | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (of silu_and_mul(x) if gated), plus the rows' adapter
    updates; through the gemv kernel for a CUDA decode batch."""
    if gemv is not None and suits(x) and weight.dtype == x.dtype:
        out = gemv(x, weight, gated=gated, lora=lora)  # [rows, out]
        return out if bias is None else out + bias
    out = F.linear(silu_and_mul(x) if gated else x, weight, bias)
    return out if lora is None else lora.add_to(out)


class DenseWeight:
    """weight [out, in] in the model dtype."""

    def create(self, layer: nn.Module, in_features: int, out_features: int, full_in_features: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def load(self, layer: nn.Module, name: str, loaded, out_cut, in_cut, rows: tuple[int, int]) -> None:
        if name != "weight":
            raise ValueError(f"unexpected tensor {name!r}: the model is not quantized")
        layer.weight.data[rows[0]:rows[1]].copy_(read_shard(loaded, {0: out_cut, 1: in_cut}))

    def finish(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False,
              lora: LoRAUpdate | None = None) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias, gated, lora)


def weight_scheme(quant: QuantConfig | None):
    if quant is None:
        return DenseWeight()
    return Fp8Weight() if quant.method == "fp8" else Int4Weight(quant)


class MergedColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, pieces: list[tuple[int, int]], bias: bool = False,
                 quant: QuantConfig | None = None, deferred: bool = False):
        """`pieces`: (rows in the checkpoint, parts it is cut into) for each stacked matrix."""
        super().__init__()
        self.deferred = deferred
        self.in_features = in_features
        self.lora: LoRASlots | None = None  # adapters' updates, when some adapter touches this layer
        tp = tensor_parallel()
        self.shares = [tp.part(rows, parts) for rows, parts in pieces]  # (start, length) each
        self.offsets = [sum(length for _, length in self.shares[:i]) for i in range(len(pieces) + 1)]
        self.scheme = weight_scheme(quant)
        self.scheme.create(self, in_features, self.offsets[-1], in_features)
        self.bias = nn.Parameter(torch.empty(self.offsets[-1]), requires_grad=False) if bias else None

    def load_piece(self, index: int, loaded, name: str = "weight") -> None:
        start, length = self.shares[index]
        rows = (self.offsets[index], self.offsets[index + 1])
        if name == "bias":
            self.bias.data[rows[0]:rows[1]].copy_(loaded[start:start + length])
        else:
            self.scheme.load(self, name, loaded, (start, length), None, rows)

    def finish_loading(self) -> None:
        self.scheme.finish(self)

    def lora_geometry(self):
        """For LoRASlots: inputs, each piece's (offset, length) in the output and the rows of its
        B this rank keeps, and the columns of A (all)."""
        outputs = [(self.offsets[i], self.offsets[i + 1] - self.offsets[i]) for i in range(len(self.shares))]
        return self.in_features, outputs, list(self.shares), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and self.lora.bank.active:
            return self.lora.apply(self, x, self.bias, False)
        return self.scheme.apply(self, x, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant: QuantConfig | None = None, gated: bool = False, deferred: bool = False):
        """gated: the input is [gate | up] (twice in_features wide), multiplied as silu(gate) * up."""
        super().__init__()
        self.gated, self.deferred = gated, deferred
        self.lora: LoRASlots | None = None  # adapters' updates, when some adapter touches this layer
        self.in_share = tensor_parallel().part(in_features)  # (start, length)
        self.out_features = out_features
        self.scheme = weight_scheme(quant)
        self.scheme.create(self, self.in_share[1], out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, loaded, name: str = "weight") -> None:
        if name == "bias":
            self.bias.data.copy_(loaded[:])
        else:
            self.scheme.load(self, name, loaded, None, self.in_share, (0, self.out_features))

    def finish_loading(self) -> None:
        self.scheme.finish(self)

    def lora_geometry(self):
        """For LoRASlots: this rank's inputs, the one output piece (B whole), and A's columns of
        this rank's inputs."""
        return self.in_share[1], [(0, self.out_features)], [None], self.in_share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None and self.lora.bank.active:
            partial = self.lora.apply(self, x, None, self.gated)
        else:
            partial = self.scheme.apply(self, x, None, self.gated)
        out = all_reduce(partial)  # the ranks' shares of the product and of the update
        return out + self.bias if self.bias is not None else out
