"""Mixtral's experts from their quantized weights: fused_moe.py's two grouped matmuls over the
(token, expert) pairs sorted by expert, with each weight tile read as it is stored and
dequantized in registers, so that no dequantized copy of an expert is ever made.

Per BLOCK_M pairs of one expert e (fused_moe.py's `sort_by_expert` blocks):
    inter[pair] = silu(x[token] @ W1[e]^T) * (x[token] @ W3[e]^T)
    out[pair]   = weight[pair] * inter[pair] @ W2[e]^T
and the k outputs of each token are summed in token order. The weights are a layer's experts
stacked (server/kernels/quant_reference.py's `Int4Experts` and `Fp8Experts`), W1 above W3 in
w13's outputs:
  4-bit: qweight [E, K/8, N] int32, eight inputs a word; zeros [E, G, N] uint8 and scales
      [E, G, N]. A tile of BLOCK_K inputs (inside one group unless g_idx names each row's group)
      is unpacked and dequantized in float32, as int4_matmul.py does, then rounded to x's dtype
      for tl.dot. Under act-order an expert's rows are sorted by group and `perm` [E, K] says
      which input each row multiplies: the kernel gathers those columns of its activations.
  fp8: weight [E, N, K] e4m3, widened to x's dtype as it is read (exact); each output's sum
      is multiplied by its channel's scale [E, N] at the end.
Everything is device work (the sort too), so a decode step through this layer can be
captured in a CUDA graph.

A decode step of up to GEMV_PAIRS pairs reads each pair's rows from its own expert through
the dense layers' decode products instead, as fused_moe.py's half-precision one does (the
grouped kernel's tiles of 16 rows for one or two would read the weight below the copy rate):
e4m3 through gemv (server/kernels/gemv.py: the per-channel scales applied at the end,
SiLU-and-multiply fused into the down product); 4-bit whose groups are runs through int4_gemv's
mma path (`int4_gemv_experts`), SiLU-and-multiply between the two.

Other decode steps (up to BY_PAIR_MAX pairs) skip the sort, whose dozen small launches a layer would
weigh on a step that reads little else: each pair is a block of its own (row 0 of BLOCK_M),
its expert read from topk_ids, so only the picked experts' weights are read (an expert that
two pairs pick, twice). The down kernel can split K (`split_k`) so that a few pairs still
keep every SM reading: each split writes float32 partial sums, added with the k outputs of
each token at the end (in a fixed order: the result does not depend on scheduling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.activation import silu_and_mul
from server.kernels.fused_moe import GEMV_PAIRS, MoEConfig, experts_by_gemv, sort_by_expert, weighted_sum
from server.kernels.gemv import MAX_ROWS
from server.kernels.int4_gemv import int4_gemv_experts
from server.kernels.int4_matmul import _dequantized_tile, tile_k
from server.kernels.precision import dot_precision
from server.kernels.quant_reference import Fp8Experts, Int4Experts


BY_PAIR_MAX = 8  # pairs up to which a step skips the sort (each pair its own block)


@dataclass(frozen=True)
class QuantizedMoEConfig(MoEConfig):
    """fused_moe's tiles, and: `by_pair`, each pair a block of its own (no sort); `split_k`,
    the down kernel's splits of the intermediate dimension."""

    by_pair: bool = False
    split_k: int = 1


@triton.jit
def _block_of_pairs(pair_ids_ptr, block_expert_ptr, num_pairs, BY_PAIR: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's expert (-1: none), its BLOCK_M pairs and which of them are real: from the
    sort, or (BY_PAIR) pair program_id(0) alone in row 0, its expert from topk_ids."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if BY_PAIR:
        pairs = tl.where(tl.arange(0, BLOCK_M) == 0, block, num_pairs)
    else:
        pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, pairs, pairs < num_pairs


@triton.jit
def _quantized_expert_matmul(a_ptr, rows, valid, expert, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, perm_ptr,
                             cols, cmask, k_lo, k_hi, N: tl.constexpr, K: tl.constexpr, GROUPS: tl.constexpr,
                             FP8: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                             HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 = A[rows, k_lo:k_hi] @ W[expert][cols, k_lo:k_hi]^T, A
    row-major with K columns, W one expert of the stacked weights (N outputs, K inputs; BLOCK_K
    divides K and k_lo)."""
    e = expert.to(tl.int64)
    if FP8:
        w_ptr += e * (N * K)
    else:
        w_ptr += e * (K // 8 * N)
        zeros_ptr += e * (GROUPS * N)
        scales_ptr += e * (GROUPS * N)
        g_idx_ptr += e * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        inputs = tl.load(perm_ptr + e * K + ks) if HAS_PERM else ks
        a = tl.load(a_ptr + rows[:, None] * K + inputs[None, :], mask=valid[:, None], other=0.0)
        if FP8:
            w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=cmask[None, :], other=0.0)
        else:
            w = _dequantized_tile(w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, k0, cols, cmask, N,
                                  GROUP_SIZE, HAS_G_IDX, BLOCK_K, BLOCK_N)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    if FP8:
        acc *= tl.load(scales_ptr + e * N + cols, mask=cmask, other=0.0)[None, :]
    return acc


@triton.jit
def _quantized_gate_up_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, inter_ptr,
                              pair_ids_ptr, block_expert_ptr, num_pairs, TOP_K: tl.constexpr,
                              HIDDEN: tl.constexpr, INTER: tl.constexpr, GROUPS: tl.constexpr,
                              FP8: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                              HAS_PERM: tl.constexpr, BY_PAIR: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    expert, pairs, valid = _block_of_pairs(pair_ids_ptr, block_expert_ptr, num_pairs, BY_PAIR, BLOCK_M)
    if expert >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < INTER
        tokens = pairs // TOP_K
        gate = _quantized_expert_matmul(x_ptr, tokens, valid, expert, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr,
                                        perm_ptr, cols, cmask, 0, HIDDEN, 2 * INTER, HIDDEN, GROUPS, FP8,
                                        GROUP_SIZE, HAS_G_IDX, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        up = _quantized_expert_matmul(x_ptr, tokens, valid, expert, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr,
                                      perm_ptr, INTER + cols, cmask, 0, HIDDEN, 2 * INTER, HIDDEN, GROUPS, FP8,
                                      GROUP_SIZE, HAS_G_IDX, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(inter_ptr + pairs[:, None] * INTER + cols[None, :], out.to(inter_ptr.dtype.element_ty),
                 mask=valid[:, None] & cmask[None, :])


@triton.jit
def _quantized_down_kernel(inter_ptr, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, out_ptr, weights_ptr,
                           pair_ids_ptr, block_expert_ptr, num_pairs, split_k, HIDDEN: tl.constexpr,
                           INTER: tl.constexpr, GROUPS: tl.constexpr, FP8: tl.constexpr, GROUP_SIZE: tl.constexpr,
                           HAS_G_IDX: tl.constexpr, HAS_PERM: tl.constexpr, BY_PAIR: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Writes split program_id(2)'s partial sums [pairs, HIDDEN] at out_ptr + split * pairs * HIDDEN."""
    expert, pairs, valid = _block_of_pairs(pair_ids_ptr, block_expert_ptr, num_pairs, BY_PAIR, BLOCK_M)
    if expert >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < HIDDEN
        split = tl.program_id(2)
        per_split = tl.cdiv(INTER // BLOCK_K, split_k) * BLOCK_K
        k_lo = split * per_split
        acc = _quantized_expert_matmul(inter_ptr, pairs, valid, expert, w_ptr, zeros_ptr, scales_ptr, g_idx_ptr,
                                       perm_ptr, cols, cmask, k_lo, tl.minimum(k_lo + per_split, INTER), HIDDEN,
                                       INTER, GROUPS, FP8, GROUP_SIZE, HAS_G_IDX, HAS_PERM, BLOCK_M, BLOCK_N,
                                       BLOCK_K, PRECISION)
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        out = out_ptr + split.to(tl.int64) * num_pairs * HIDDEN + pairs[:, None] * HIDDEN + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


def default_config(num_pairs: int) -> QuantizedMoEConfig:
    """Tiles by the number of pairs. A dequantized 4-bit tile lives in registers as float32, so
    the tiles stay smaller than fused_moe.py's bf16 ones (int4_matmul.py's sizes). Decode
    splits the down kernel's K in four: Mixtral-8x7B's hidden 4,096 in 64-wide blocks makes 64
    programs a pair, too few to keep an H100's 132 SMs reading. Not yet swept on a GPU."""
    if num_pairs <= BY_PAIR_MAX:
        return QuantizedMoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, by_pair=True,
                                  split_k=4)
    if num_pairs <= 64:
        return QuantizedMoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=2)
    if num_pairs <= 512:
        return QuantizedMoEConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=3)
    return QuantizedMoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _weight_arguments(w: Int4Experts | Fp8Experts, largest_k: int) -> tuple[tuple, dict]:
    """The kernels' pointer arguments (weights, zeros, scales, g_idx, perm) and constants for
    one projection's experts."""
    if isinstance(w, Fp8Experts):
        K = w.in_features
        return (w.weight, w.weight, w.scale, w.weight, w.weight), dict(
            GROUPS=1, FP8=True, GROUP_SIZE=K, HAS_G_IDX=False, HAS_PERM=False, BLOCK_K=tile_k(K, K, largest_k))
    pointers = (w.qweight, w.zeros, w.scales, w.qweight if w.g_idx is None else w.g_idx,
                w.qweight if w.perm is None else w.perm)
    return pointers, dict(GROUPS=w.zeros.shape[1], FP8=False, GROUP_SIZE=w.group_size, HAS_G_IDX=w.g_idx is not None,
                          HAS_PERM=w.perm is not None, BLOCK_K=tile_k(w.in_features, w.group_size, largest_k))


def _runs_for_mma(w: Int4Experts | Fp8Experts) -> bool:
    """Whether int4_gemv's mma path can read these experts: 4-bit, in groups that are runs of
    inputs (no act-order), of whole 32-input steps, and outputs in fours."""
    return isinstance(w, Int4Experts) and w.g_idx is None and w.perm is None and w.group_size % 32 == 0 and w.qweight.shape[2] % 4 == 0


def quantized_moe(x: torch.Tensor, w13: Int4Experts | Fp8Experts, w2: Int4Experts | Fp8Experts,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: QuantizedMoEConfig | None = None) -> torch.Tensor:
    """x [tokens, hidden] -> [tokens, hidden]; the math of `quantized_moe_reference`
    (server/kernels/reference.py). w13's outputs are [gate | up] of each expert's 2 * inter."""
    num_tokens, hidden = x.shape
    inter = w2.in_features
    num_experts = w13.scale.shape[0] if isinstance(w13, Fp8Experts) else w13.qweight.shape[0]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    # A decode step's few rows, each read from its own expert by the dense layers' decode products
    decode_rows = config is None and num_pairs <= min(GEMV_PAIRS, MAX_ROWS) and x.dtype in (torch.bfloat16,
                                                                                               torch.float16)
    if decode_rows and isinstance(w13, Fp8Experts):
        return experts_by_gemv(x, w13.weight, w2.weight, topk_weights, topk_ids, w13.scale, w2.scale)
    if decode_rows and _runs_for_mma(w13) and _runs_for_mma(w2):
        experts = topk_ids.flatten()
        gate_up = int4_gemv_experts(x, w13.qweight, w13.zeros, w13.scales, w13.group_size, experts)
        down = int4_gemv_experts(silu_and_mul(gate_up), w2.qweight, w2.zeros, w2.scales, w2.group_size, experts)
        return weighted_sum(down, topk_weights)
    c = config or default_config(num_pairs)
    if c.by_pair:
        block_expert = topk_ids.flatten()
        pair_ids = block_expert  # not read
    else:
        pair_ids, block_expert = sort_by_expert(topk_ids, num_experts, c.block_m)
    tiles = dict(BY_PAIR=c.by_pair, BLOCK_M=c.block_m, BLOCK_N=c.block_n, PRECISION=dot_precision(x.dtype),
                 num_warps=c.num_warps, num_stages=c.num_stages)
    pointers, constants = _weight_arguments(w13, c.block_k)
    inter_out = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    _quantized_gate_up_kernel[(block_expert.numel(), triton.cdiv(inter, c.block_n))](
        x.contiguous(), *pointers, inter_out, pair_ids, block_expert, num_pairs, TOP_K=top_k, HIDDEN=hidden,
        INTER=inter, **constants, **tiles)
    pointers, constants = _weight_arguments(w2, c.block_k)
    split_k = min(c.split_k, inter // constants["BLOCK_K"])
    pair_out = torch.empty((split_k, num_pairs, hidden), dtype=torch.float32 if split_k > 1 else x.dtype,
                           device=x.device)
    _quantized_down_kernel[(block_expert.numel(), triton.cdiv(hidden, c.block_n), split_k)](
        inter_out, *pointers, pair_out, topk_weights.flatten().float().contiguous(), pair_ids, block_expert,
        num_pairs, split_k, HIDDEN=hidden, INTER=inter, **constants, **tiles)
    return pair_out.view(split_k, num_tokens, top_k, hidden).sum(dim=(0, 2)).to(x.dtype)
