"""4-bit weights from AWQ and GPTQ checkpoints, held in one layout and multiplied by the
kernels below (server/kernels/quant_reference.py describes all three layouts).

Each rank reads its slice of the checkpoint tensors as they are stored: a column-parallel
piece cuts the outputs (eight per word of AWQ's qweight and of both formats' qzeros), a
row-parallel rank cuts the inputs by whole groups (eight per word of GPTQ's qweight). With
GPTQ's act-order the groups are spread over the inputs, so a row-parallel rank keeps the
g_idx of its inputs and all the scales and zeros (a small table), as TGI does.

Once read, the weights are repacked into our layout: GPTQ's packing along the inputs, zero
points as they are (the original GPTQ format's minus one undone), and under act-order the
inputs sorted by group, so that groups are runs again and the kernel reads one row of scales
per tile; the activations' columns are gathered in the same order (`perm`). Where a rank's
sorted inputs still do not form whole groups (act-order under row parallelism), the kernel
reads each input's group from g_idx.

On the GPU: a decode batch of one to GEMV_MAX_ROWS (8) rows through kernels/int4_gemv.py
(its mma path, the weight going from registers into the tensor cores: on a Mistral-7B layer on
an H100, faster than bf16's gemv and than int4_matmul; docs/kernels.md has the figures),
batches of up to FUSED_MAX_ROWS through kernels/int4_matmul.py, and larger ones (the largest
decode batches, prefill) as the weight dequantized to the activations' dtype and one dense
matmul. On the CPU the weight is dequantized with torch at every call rather than kept: the
layer then holds only the 4-bit tensors, as on the GPU, and the CPU path (the tests' oracle)
computes from exactly them.

A layer made with `deferred=True` (each of a Llama layer's four) whose decode product runs on
the mma path returns its outputs as deferred sums (int64; kernels/int4_gemv.py), which the
kernel reading them (the norm, silu_and_mul, the rotary embedding) turns into the model dtype:
a product's splits then end without adding their sums up themselves, which is faster
(docs/kernels.md has the figures). The sums go to one buffer per
width, which every layer of that width shares (each is read, and zeroed, before the next layer
writes it), made with the layer and so before any CUDA graph is captured; `clear_deferred_sums`
zeroes them after a forward pass that stopped between a product and its reader.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.quant_reference import AWQ_ORDER, dequantize_int4, group_of_each_input, pack_int4, unpack_int4
from server.config import QuantConfig
from server.layers.activation import silu_and_mul
from server.layers.parallel import read_shard

try:
    from server.kernels.gemv import suits
    from server.kernels.int4_gemv import GEMV_MAX_ROWS, int4_gemv, split_counters
    from server.kernels.int4_matmul import int4_dequantize, int4_matmul
except ImportError:  # pragma: no cover - no triton: the CPU path only
    int4_matmul = int4_dequantize = int4_gemv = split_counters = suits = None
    GEMV_MAX_ROWS = 0

# int4_matmul unpacks the words again for each block of 64 rows: on an H100 a Mistral-7B layer of
# more than 128 rows was faster dequantized first, one of 128 rows through int4_matmul
# (`python benchmarks/kernel_bench/int4_gemv.py --batched 128,192,256`; docs/kernels.md has the figures)
FUSED_MAX_ROWS = 128
_DEFERRED: dict[tuple[int, torch.device], torch.Tensor] = {}  # (width, device) -> int64 [GEMV_MAX_ROWS, width]


def deferred_sums(width: int, device: torch.device) -> torch.Tensor:
    """The zeroed buffer that the deferred products of this width share on `device`."""
    key = (width, torch.device(device))
    if key not in _DEFERRED:
        _DEFERRED[key] = torch.zeros(GEMV_MAX_ROWS, width, dtype=torch.int64, device=device)
    return _DEFERRED[key]


def clear_deferred_sums() -> None:
    """Zero every deferred-sum buffer: after a forward pass cut short, sums may be left unread."""
    for sums in _DEFERRED.values():
        sums.zero_()

GROUP = 0  # in a layout below: one entry per group of inputs
# checkpoint tensor -> (outputs per entry along dim 1, inputs per entry along dim 0)
_AWQ = {"qweight": (8, 1), "qzeros": (8, GROUP), "scales": (1, GROUP)}
_GPTQ = {"qweight": (1, 8), "qzeros": (8, GROUP), "scales": (1, GROUP), "g_idx": (None, 1)}


def _entries(cut: tuple[int, int] | None, per: int) -> tuple[int, int] | None:
    """A (start, length) of rows or columns of the weight -> of entries holding `per` of them."""
    if cut is None:
        return None
    if cut[0] % per or cut[1] % per:
        raise ValueError(f"a rank's share {cut} of a 4-bit tensor does not fall on its entries of {per}")
    return cut[0] // per, cut[1] // per


class Int4Weight:
    """Checkpoint tensors while loading; then qweight [in/8, out] int32, zeros [groups, out]
    uint8, scales [groups, out], g_idx [in] int32 or None, perm [in] or None."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant
        self.layout = _AWQ if quant.method == "awq" else _GPTQ

    def create(self, layer: nn.Module, in_features: int, out_features: int, full_in_features: int) -> None:
        q = self.quant
        # Every rank needs every group when one group spans all inputs, or act-order spreads them.
        layer.groups_whole = q.group_size == -1 or q.desc_act
        layer.group_size = in_features if q.group_size == -1 else q.group_size
        groups = 1 if q.group_size == -1 else (full_in_features if q.desc_act else in_features) // q.group_size
        int32 = dict(dtype=torch.int32)
        if q.method == "awq":
            layer.qweight = nn.Parameter(torch.empty(in_features, out_features // 8, **int32), requires_grad=False)
        else:
            layer.qweight = nn.Parameter(torch.empty(in_features // 8, out_features, **int32), requires_grad=False)
            layer.g_idx = nn.Parameter(torch.full((in_features,), -1, **int32), requires_grad=False)
        layer.qzeros = nn.Parameter(torch.empty(groups, out_features // 8, **int32), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(groups, out_features), requires_grad=False)

    def load(self, layer: nn.Module, name: str, loaded, out_cut, in_cut, rows: tuple[int, int]) -> None:
        if name not in self.layout:
            raise ValueError(f"unexpected tensor {name!r} in a 4-bit {self.quant.method} layer "
                             f"({', '.join(self.layout)})")
        out_per, in_per = self.layout[name]
        if in_per == GROUP:
            in_per = None if layer.groups_whole else layer.group_size
        cuts = {0: _entries(in_cut, in_per) if in_per else None,
                1: _entries(out_cut, out_per) if out_per else None}
        target = getattr(layer, name)
        piece = read_shard(loaded, cuts).to(target.device)
        if out_per is None:  # g_idx: the pieces of a merged layer share their inputs, so must agree on it
            if (target >= 0).all() and not torch.equal(target, piece.to(target.dtype)):
                raise ValueError("g_idx differs between matrices that share their inputs")
            target.data.copy_(piece)
        else:
            target.data[:, rows[0] // out_per:rows[1] // out_per].copy_(piece)

    def finish(self, layer: nn.Module) -> None:
        if self.quant.method == "awq":
            ints = unpack_int4(layer.qweight, dim=1, order=AWQ_ORDER)  # [in, out]
            zeros = unpack_int4(layer.qzeros, dim=1, order=AWQ_ORDER)
            g_idx = perm = None
        else:
            ints = unpack_int4(layer.qweight, dim=0)
            zeros = unpack_int4(layer.qzeros, dim=1) + self.quant.zero_offset
            g_idx, ints, perm = self._sorted_groups(layer, ints)
        del layer.qzeros
        layer.qweight = nn.Parameter(pack_int4(ints, dim=0), requires_grad=False)
        layer.zeros = nn.Parameter(zeros, requires_grad=False)
        layer.g_idx = None if g_idx is None else nn.Parameter(g_idx, requires_grad=False)
        layer.perm = None if perm is None else nn.Parameter(perm, requires_grad=False)
        layer.num_sms = torch.cuda.get_device_properties(ints.device).multi_processor_count \
            if ints.is_cuda else 0
        # made here, before any CUDA graph is captured; int4_gemv keeps them zero between calls
        layer.split_counters = split_counters(layer.qweight.shape[1], ints.device) if ints.is_cuda else None
        layer.sums = deferred_sums(layer.qweight.shape[1], ints.device) \
            if ints.is_cuda and layer.deferred else None

    def _sorted_groups(self, layer: nn.Module, ints: torch.Tensor):
        """-> (g_idx or None when input k is in group k // group_size, ints, perm or None)."""
        g_idx = layer.g_idx.data
        if (g_idx < 0).any():
            raise ValueError("a GPTQ layer came without its g_idx")
        runs = group_of_each_input(ints.shape[0], layer.group_size, ints.device).to(g_idx.dtype)
        perm = None
        if self.quant.desc_act:
            order = torch.argsort(g_idx, stable=True)
            if not torch.equal(order, torch.arange(len(order), device=order.device)):
                perm, ints, g_idx = order, ints[order], g_idx[order]
        else:  # a row-parallel rank's slice starts at its first group, as its scales do
            g_idx = g_idx - g_idx[0]
        if torch.equal(g_idx, runs):
            return None, ints, perm
        if not self.quant.desc_act:
            raise ValueError("g_idx does not put the inputs in consecutive groups, but desc_act is false")
        return g_idx, ints, perm

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
        """gated: x is [gate | up] (possibly deferred sums), multiplied as silu(gate) * up (see
        linear.py). Deferred sums come back where the layer's are (the module's docstring)."""
        if gated:
            x = silu_and_mul(x, dtype=layer.scales.dtype)
        if layer.perm is not None:
            x = x[:, layer.perm]
        tensors = (layer.qweight, layer.zeros, layer.scales, layer.g_idx, layer.group_size)
        if x.is_cuda and x.shape[0] <= GEMV_MAX_ROWS and suits(x):
            sums = layer.sums if bias is None else None
            out = int4_gemv(x, *tensors, counters=layer.split_counters, sums=sums)
        elif x.is_cuda and x.shape[0] <= FUSED_MAX_ROWS:
            out = int4_matmul(x, *tensors, num_sms=layer.num_sms)
        elif x.is_cuda:
            out = x @ int4_dequantize(*tensors, dtype=x.dtype)
        else:
            g_idx = layer.g_idx if layer.g_idx is not None else \
                group_of_each_input(x.shape[1], layer.group_size, x.device)
            weight = dequantize_int4(unpack_int4(layer.qweight, dim=0), layer.zeros, layer.scales, g_idx)
            out = F.linear(x, weight.to(x.dtype))
        return out + bias if bias is not None else out
