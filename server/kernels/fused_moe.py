"""Mixtral's experts as two grouped matmuls over tokens sorted by expert.

Each (token, choice) pair goes to one expert. Pairs are sorted by expert and each expert's
run is padded to a multiple of BLOCK_M, so that a block of BLOCK_M rows belongs to a single
expert (`block_expert`, -1 past the end). Then, per block:
    inter[pair] = silu(x[token] @ W1[e]^T) * (x[token] @ W3[e]^T)     (gate and up from the same rows)
    out[pair]   = weight[pair] * inter[pair] @ W2[e]^T
and the k outputs of each token are summed back into token order. Weights are stacked
`w13 [experts, 2 * inter, hidden]` (W1 above W3) and `w2 [experts, hidden, inter]`. The sort
is done with device ops only (no host round trip), so the whole layer can be graph-captured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.gemv import MAX_ROWS, gemv
from server.kernels.precision import dot_precision

GEMV_PAIRS = 4  # up to this many (token, expert) pairs, each pair's rows are read by gemv


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """-> (pair ids in padded expert order [capacity] (num_pairs marks padding),
    the expert of each BLOCK_M block [capacity // block_m] (-1 for unused blocks))."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount reads its size back to the host, which graphs forbid
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - start[sorted_experts]
    capacity = (num_pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    pair_ids = torch.full((capacity,), num_pairs, dtype=torch.int64, device=flat.device)
    pair_ids[padded_start[sorted_experts] + rank] = order
    block_first_row = torch.arange(0, capacity, block_m, device=flat.device)
    ends = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(ends, block_first_row, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return pair_ids, block_expert


@triton.jit
def _expert_matmul(a_ptr, rows, valid, w_ptr, cols, cmask, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 = A[rows, :K] @ W[cols, :K]^T (both row-major, K columns)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _block_pairs_and_cols(pair_ids_ptr, num_pairs, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_M pairs (and which are real) and BLOCK_N output columns (of N)."""
    pairs = tl.load(pair_ids_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pairs, pairs < num_pairs, cols, cols < N


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, inter_ptr, pair_ids_ptr, block_expert_ptr, num_pairs,
                    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        pairs, valid, cols, cmask = _block_pairs_and_cols(pair_ids_ptr, num_pairs, INTER, BLOCK_M, BLOCK_N)
        w_gate = w13_ptr + expert.to(tl.int64) * (2 * INTER * HIDDEN)
        gate = _expert_matmul(x_ptr, pairs // TOP_K, valid, w_gate, cols, cmask, HIDDEN,
                              BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        up = _expert_matmul(x_ptr, pairs // TOP_K, valid, w_gate + INTER * HIDDEN, cols, cmask, HIDDEN,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(inter_ptr + pairs[:, None] * INTER + cols[None, :], out.to(inter_ptr.dtype.element_ty),
                 mask=valid[:, None] & cmask[None, :])


@triton.jit
def _down_kernel(inter_ptr, w2_ptr, out_ptr, weights_ptr, pair_ids_ptr, block_expert_ptr, num_pairs,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        pairs, valid, cols, cmask = _block_pairs_and_cols(pair_ids_ptr, num_pairs, HIDDEN, BLOCK_M, BLOCK_N)
        acc = _expert_matmul(inter_ptr, pairs, valid, w2_ptr + expert.to(tl.int64) * (HIDDEN * INTER), cols, cmask,
                             INTER, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        tl.store(out_ptr + pairs[:, None] * HIDDEN + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & cmask[None, :])


@dataclass(frozen=True)
class MoEConfig:
    """Tiles and launch shape of both kernels (the same for the two)."""

    block_m: int
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3


def default_config(num_pairs: int, itemsize: int = 2) -> MoEConfig:
    """Tiles chosen by `benchmarks/kernel_bench/moe_kernel.py --sweep` for Mixtral-8x7B's layer: up
    to 128 pairs on an H100; more pairs on an H200, 128-square tiles on 8 warps (64-wide steps
    along K, four deep, past 2,048 pairs). docs/kernels.md has the sweep. float32 keeps the
    small tiles: on an H100 the large ones failed to launch (a CUDA out-of-memory) once the KV
    cache held the GPU's memory, most likely for the local memory of spilled registers."""
    if num_pairs <= 64:
        return MoEConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)
    if num_pairs <= 128:
        return MoEConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if itemsize > 2:  # float32 (tests on a GPU)
        return MoEConfig(block_m=64)
    if num_pairs <= 2048:
        return MoEConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
    return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)


def fused_moe(x, w13, w2, topk_weights, topk_ids, config: MoEConfig | None = None):
    """x [tokens, hidden] -> [tokens, hidden]; the same math as `fused_moe_reference`.
    A half-precision decode step of one or two tokens (at most GEMV_PAIRS pairs, and no
    config asked for) skips the sort: each pair is two gemv rows read from its own expert,
    gate and up in one product and down with SiLU-and-multiply fused. With so few rows the
    grouped kernel's 16-row tiles would be mostly padding, and the sort adds a dozen small
    launches a layer (Mixtral-8x7B's batch-1 decode on an H200 was faster this way:
    docs/kernels.md)."""
    num_tokens, hidden = x.shape
    num_experts, double_inter, _ = w13.shape
    inter = double_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if config is None and num_pairs <= min(GEMV_PAIRS, MAX_ROWS) and x.dtype in (torch.bfloat16, torch.float16):
        return experts_by_gemv(x, w13, w2, topk_weights, topk_ids)
    c = config or default_config(num_pairs, x.element_size())
    pair_ids, block_expert = sort_by_expert(topk_ids, num_experts, c.block_m)
    tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PRECISION=dot_precision(x.dtype),
                 num_warps=c.num_warps, num_stages=c.num_stages)
    inter_out = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    grid = (block_expert.numel(), triton.cdiv(inter, c.block_n))
    _gate_up_kernel[grid](x.contiguous(), w13, inter_out, pair_ids, block_expert, num_pairs, TOP_K=top_k,
                          HIDDEN=hidden, INTER=inter, **tiles)
    pair_out = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    grid = (block_expert.numel(), triton.cdiv(hidden, c.block_n))
    _down_kernel[grid](inter_out, w2, pair_out, topk_weights.flatten().float().contiguous(), pair_ids, block_expert,
                       num_pairs, HIDDEN=hidden, INTER=inter, **tiles)
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1)


def experts_by_gemv(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None) -> torch.Tensor:
    """A decode step's few (token, expert) pairs (up to MAX_ROWS), each two gemv rows read from
    its own expert's stacked weight (e4m3 with its per-channel scales): gate and up in one
    product, down with SiLU-and-multiply fused -> [tokens, hidden]."""
    experts = topk_ids.flatten()
    gate_up = gemv(x.contiguous(), w13, weight_scale=w13_scale, experts=experts)  # [pairs, 2 * inter]
    return weighted_sum(gemv(gate_up, w2, weight_scale=w2_scale, experts=experts, gated=True), topk_weights)


def weighted_sum(pair_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """[pairs, hidden] of the (token, expert) pairs in token order -> [tokens, hidden]: each
    token's k outputs weighted by the router and summed in float32."""
    tokens, top_k = topk_weights.shape
    return (pair_out.view(tokens, top_k, -1).float() * topk_weights[..., None]).sum(dim=1).to(pair_out.dtype)
