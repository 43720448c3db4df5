"""Paged attention for prefill: variable-length query chunks that attend to their whole
context in the cache (prefix-cached blocks, earlier chunks of a chunked prefill, and this
step's tokens, which are written to the cache first).

Program (head group, seq, token block) takes BLOCK_T tokens of one sequence for HEADS query
heads of one KV head: its BLOCK_T * HEADS query rows (row r: token r // HEADS, head r % HEADS of
the group) share every key and value tile, so a tile is gathered once for HEADS heads and the
products are HEADS times taller. HEADS is the largest power of two that divides the group
(`packed_heads`; 4 for Mistral's 32 over 8, 1 for a group of 3). Token t sits at position
ctx - q_len + t. A program walks the keys from the window's start to its last token's position
in BLOCK_N tiles, gathering each key's slot through the block table, with an online softmax
(exp2 in log2 units). The head groups vary fastest in the grid, so that the groups sharing a KV
head run at once and read its tiles from L2 after the first (the 256-request workload ran
faster so on an H100; docs/kernels.md has the figures). Rows that see no key yet in a tile
keep their running state: the max is read as 0 there, so no -inf minus -inf appears. An fp8
cache is read as k_cache * k_scale (and v likewise), rounded to q's dtype.

In a mixed step (server/layers/attention.py) the sequences of one token go to the decode
kernel, which reads a context once for all the query heads of a KV head, and this kernel takes
the others (`seq_ids`): here a one-token sequence would cost a whole 64-row tile per key tile
and per head group. One layer's attention for seven prompts of 585 tokens beside 74 decoding
sequences was faster that way than here alone (`benchmarks/kernel_bench/prefill_attention.py`, one
H100), and so were the 256-request workload's prefill steps. Tiles of 64 rows by 32 keys,
4 heads a program: in `benchmarks/kernel_bench/prefill_attention.py --sweep` on one H100 they beat
one head a program at prompts of seven times 585 to 8,192 tokens; 64-key tiles were slower at
every length, and 128-row tiles over 8 warps too but at 8,192 tokens, where they were slightly
ahead. docs/kernels.md has the sweep.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.cache import load_cached, paged_offsets
from server.kernels.precision import LOG2E, dot_precision
from server.kernels.quant_reference import FP8


@triton.jit
def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_query_lens_ptr, context_lens_ptr, out_ptr, seq_ids_ptr,
        scale_log2, window, k_scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        stride_cb, stride_cs, stride_ch,
        GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FP8_CACHE: tl.constexpr,
        INDEXED: tl.constexpr):
    # Program (head group, seq, token block): BLOCK_T tokens x HEADS query heads of one KV head.
    head0 = tl.program_id(0) * HEADS  # the fastest: the groups that share a KV head run together
    seq = tl.program_id(1)
    if INDEXED:  # a mixed step: the sequences of more than one token, listed
        seq = tl.load(seq_ids_ptr + seq).to(tl.int32)
    t_block = tl.program_id(2)
    q_start = tl.load(cu_query_lens_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_query_lens_ptr + seq + 1).to(tl.int32) - q_start
    if t_block * BLOCK_T < q_len:
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        kv_head = head0 // GROUP
        r = tl.arange(0, BLOCK_T * HEADS)  # row r: token r // HEADS, head head0 + r % HEADS
        tokens = t_block * BLOCK_T + r // HEADS
        heads = head0 + r % HEADS
        rmask = tokens < q_len
        q_pos = ctx - q_len + tokens
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full([BLOCK_T * HEADS], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_T * HEADS], tl.float32)
        acc = tl.zeros([BLOCK_T * HEADS, BLOCK_D], tl.float32)
        first_pos = ctx - q_len + t_block * BLOCK_T
        hi = tl.minimum(first_pos + BLOCK_T, ctx)
        lo = 0
        if window > 0:
            lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            k_pos = n0 + tl.arange(0, BLOCK_N)
            kmask = k_pos < hi
            slot = paged_offsets(block_tables_ptr, stride_bt, seq, k_pos, kmask, PAGE, stride_cb, stride_cs,
                                 kv_head, stride_ch)
            kv_mask = kmask[:, None] & dmask[None, :]
            k = load_cached(k_cache_ptr, slot[:, None] + d[None, :], kv_mask, k_scale, q, FP8_CACHE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [rows, BLOCK_N]
            allowed = kmask[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if window > 0:
                allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            v = load_cached(v_cache_ptr, slot[:, None] + d[None, :], kv_mask, v_scale, q, FP8_CACHE)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_start + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles and launch shape (benchmarks/kernel_bench/prefill_attention.py sweeps them)."""

    block_m: int = 64  # query rows a program: tokens x query heads (16 for chunks of up to 32 tokens)
    block_n: int = 32  # keys a tile
    num_warps: int = 4
    num_stages: int = 2
    heads: int | None = None  # query heads of one KV head a program takes (None: `packed_heads`)


def packed_heads(group: int, block_m: int) -> int:
    """The most query heads of a KV head's group a program can take: a power of two that divides
    the group, leaving at least one token a program."""
    heads = 1
    while group % (heads * 2) == 0 and heads * 2 <= block_m:
        heads *= 2
    return heads


def prefill_attention(q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, max_query_len: int,
                      scale: float, window: int | None, out=None, k_scale: float = 1.0, v_scale: float = 1.0,
                      seq_ids=None, config: PrefillConfig | None = None):
    """q [num_tokens, heads, head_dim] (sequence i owns rows cu_query_lens[i]:cu_query_lens[i+1]).
    `seq_ids`: only these sequences' rows (of at most max_query_len tokens) are computed."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0] if seq_ids is None else seq_ids.shape[0]
    _, page, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    group = num_heads // num_kv_heads
    c = config or PrefillConfig(block_m=64 if max_query_len > 32 else 16)
    heads = c.heads or packed_heads(group, c.block_m)
    if group % heads or c.block_m % heads:
        raise ValueError(f"{heads} heads a program: not a divisor of the group ({group}) and of block_m ({c.block_m})")
    block_t = c.block_m // heads
    _prefill_kernel[(num_heads // heads, num_seqs, triton.cdiv(max_query_len, block_t))](
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, out,
        seq_ids if seq_ids is not None else context_lens,  # unread unless INDEXED
        scale * LOG2E, window or 0, k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page, BLOCK_T=block_t, BLOCK_N=c.block_n, PRECISION=dot_precision(q.dtype),
        FP8_CACHE=k_cache.dtype == FP8, INDEXED=seq_ids is not None, num_warps=c.num_warps, num_stages=c.num_stages)
    return out
