"""Quantized weights in plain torch: the 4-bit layouts of AWQ and GPTQ checkpoints, fp8 (e4m3)
with per-row scales, and the math the quantized matmul kernels must reproduce. The CPU path
runs these, and tests hold the kernels to them. No triton here.

A layer has K inputs and N outputs; 4-bit weights come in G groups of `group_size` inputs,
each group with its own scale and zero point per output: w[k, n] = (q[k, n] - z[g, n]) * s[g, n].
The dequantizers return the weight as nn.Linear holds it, [N, K], in float32.

  AWQ (AutoAWQ's GEMM layout): qweight [K, N/8] int32, eight outputs per word: bits 4i..4i+3
      of word c hold column 8c + AWQ_ORDER[i]; qzeros [G, N/8] packed the same way; scales
      [G, N]. Input k is in group k // group_size. Zero points are stored as they are.
  GPTQ: qweight [K/8, N] int32, eight inputs per word: bits 4i..4i+3 of word r hold input
      8r + i; qzeros [G, N/8], bits 4i..4i+3 of word c holding column 8c + i; scales [G, N];
      g_idx [K], the group of each input (with act-order, `desc_act`, groups are not runs of
      consecutive inputs). The original format ("gptq") stores each zero point minus one;
      "gptq_v2" stores it as it is.
  Ours (what the layers keep at run time): qweight packed as GPTQ's, zeros [G, N] uint8 as
      they are, scales [G, N], and g_idx when groups are not consecutive runs.

A layer's quantized experts (Mixtral) are each expert's tensors in ours, or fp8, stacked along
a first dimension of experts: `Int4Experts` and `Fp8Experts`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column (of 8) that nibble i of an AWQ word holds
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_MIN_SCALE = 1e-12  # a row of zeros still gets a positive scale (and quantizes to zeros)


# Deferred sums (kernels/int4_gemv.py): a product's outputs as int64 counts of SUM_UNIT, which its
# splits of K add up in any order and the kernel that reads them turns into the activations' dtype.
SUM_UNIT = 2.0 ** -32


def finish_sums(sums: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Deferred sums -> their values in `dtype` (through float32, rounded as the kernels round
    them); the sums are set back to zero, ready for the next product."""
    values = (sums.to(torch.float32) * SUM_UNIT).to(dtype)
    sums.zero_()
    return values


def unpack_int4(packed: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """int32 words -> their nibbles (uint8), eight per word along `dim`; `order[i]` is the
    position (of 8) that nibble i holds."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(dim + 1) >> shifts.view([8] + [1] * (packed.dim() - dim - 1))) & 0xF
    place = torch.tensor(order, device=packed.device).argsort()  # nibble index for each position
    nibbles = nibbles.index_select(dim + 1, place)
    return nibbles.flatten(dim, dim + 1).to(torch.uint8)


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32 along `dim`, value 8r + i in bits 4i..4i+3 of word r."""
    shape = list(values.shape)
    shape[dim:dim + 1] = [shape[dim] // 8, 8]
    nibbles = values.to(torch.int32).reshape(shape)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    words = nibbles << shifts.view([8] + [1] * (len(shape) - dim - 2))
    return words.sum(dim + 1, dtype=torch.int32)  # disjoint bits: the sum is the bitwise or


def group_of_each_input(num_inputs: int, group_size: int, device=None) -> torch.Tensor:
    return torch.arange(num_inputs, device=device) // group_size


def dequantize_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """q [K, N] 4-bit values, zeros and scales [G, N], g_idx [K] -> weight [N, K] float32.
    (q - z) is a small integer and s a 16-bit float, so each product is exact in float32."""
    g = g_idx.long()
    return ((q.float() - zeros[g].float()) * scales[g].float()).t().contiguous()


def dequantize_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    q = unpack_int4(qweight, dim=1, order=AWQ_ORDER)
    zeros = unpack_int4(qzeros, dim=1, order=AWQ_ORDER)
    return dequantize_int4(q, zeros, scales, group_of_each_input(q.shape[0], group_size, q.device))


def dequantize_gptq(qweight, qzeros, scales, g_idx, zero_offset: int = 1) -> torch.Tensor:
    """`zero_offset` 1 for the original format (zero points stored minus one), 0 for gptq_v2."""
    zeros = unpack_int4(qzeros, dim=1).to(torch.int16) + zero_offset
    return dequantize_int4(unpack_int4(qweight, dim=0), zeros, scales, g_idx)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row to e4m3 with its own scale (amax / 448): the per-channel scales of a weight
    [N, K], or the dynamic per-token scales of activations [M, K]. -> (q, scale [rows])."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) * (1.0 / FP8_MAX)).clamp(min=FP8_MIN_SCALE)
    q = (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 rows times their scales (one per row, or one for all) -> float32."""
    return q.float() * scale.float().reshape(-1, 1)


def fp8_matmul_reference(x_q, x_scale, w_q, w_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """What torch._scaled_mm computes with row-wise scales: x_q [M, K] and w_q [N, K] e4m3,
    products summed in float32, then scaled by x_scale [M] and w_scale [N] -> [M, N]."""
    acc = x_q.float() @ w_q.float().t()
    return (acc * x_scale.float().view(-1, 1) * w_scale.float().view(1, -1)).to(out_dtype)


@dataclass(frozen=True)
class Int4Experts:
    """One projection of a layer's experts in our 4-bit layout, stacked: qweight [E, K/8, N]
    int32, zeros [E, G, N] uint8, scales [E, G, N]; g_idx [E, K] int32 (the group of each row of
    qweight) or None where input k is in group k // group_size; perm [E, K] int32 (act-order: the
    input that row k of qweight multiplies, its rows sorted by group) or None."""

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    perm: torch.Tensor | None
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    def dense(self) -> torch.Tensor:
        """The weights [E, N, K] float32, their inputs in the activations' order."""
        experts = []
        for e in range(self.qweight.shape[0]):
            g_idx = self.g_idx[e] if self.g_idx is not None else \
                group_of_each_input(self.in_features, self.group_size, self.qweight.device)
            weight = dequantize_int4(unpack_int4(self.qweight[e], dim=0), self.zeros[e], self.scales[e], g_idx)
            if self.perm is not None:
                weight = torch.empty_like(weight).index_copy_(1, self.perm[e].long(), weight)
            experts.append(weight)
        return torch.stack(experts)


@dataclass(frozen=True)
class Fp8Experts:
    """One projection of a layer's experts in e4m3, stacked: weight [E, N, K] and scale [E, N]
    float32 (one per output channel)."""

    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]

    def dense(self) -> torch.Tensor:
        """The weights [E, N, K] float32."""
        return self.weight.float() * self.scale.float().unsqueeze(-1)
