"""Paged attention for prefill: variable-length query chunks that attend to their whole
context in the cache (prefix-cached blocks, earlier chunks of a chunked prefill, and this
step's tokens, which are written to the cache first).

Program (head, seq, m_block) takes BLOCK_M query rows of one sequence; query row r sits at
position ctx - q_len + r. It walks the keys from the window's start to its last row's position
in BLOCK_N tiles, gathering each key's slot through the block table, with an online softmax
(exp2 in log2 units). The heads vary fastest in the grid, so that the GROUP heads sharing a KV
head run at once and read its tiles from L2 after the first (the 256-request workload on an
H100: 8,883 and 8,896 tokens/s with the sequences fastest, 8,935 and 8,933 so, alternated; its
prefill steps 3.74 s against 3.70). Rows that see no key yet in a tile keep their running
state: the max is read as 0 there, so no -inf minus -inf appears. An fp8 cache is read as
k_cache * k_scale (and v likewise), rounded to q's dtype.

In a mixed step (server/layers/attention.py) the sequences of one token go to the decode
kernel, which reads a context once for all the query heads of a KV head, and this kernel takes
the others (`seq_ids`): here a one-token sequence would cost a whole 64-row tile per key tile
and per query head. One layer's attention for 7 prompts of 585 tokens beside 74 decoding
sequences of 100-1,100 tokens took 197 us that way against 329 here alone (300 against 663
beside 200; `benchmarks/prefill_attention.py`, one H100), and the 256-request workload's 34
prefill steps went from 106 to 99 ms each. Tiles of 64 rows by 32 keys: in a sweep like
`benchmarks/prefill_attention.py --sweep` (one session) prompts of 7 x 585, 1,024, 4,096 and
8,192 tokens took 122, 55, 553 and 2,065 us a layer, against 137, 57, 614 and 2,255 with 64
keys; 128-row tiles over 8 warps were slower at every length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.cache import load_cached, paged_offsets
from kernels.precision import LOG2E, dot_precision
from kernels.quant_reference import FP8


@triton.jit
def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_query_lens_ptr, context_lens_ptr, out_ptr, seq_ids_ptr,
        scale_log2, window, k_scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        stride_cb, stride_cs, stride_ch,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FP8_CACHE: tl.constexpr,
        INDEXED: tl.constexpr):
    head = tl.program_id(0)  # the fastest: the heads that share a KV head run together and read it once
    seq = tl.program_id(1)
    if INDEXED:  # a mixed step: the sequences of more than one token, listed
        seq = tl.load(seq_ids_ptr + seq).to(tl.int32)
    m_block = tl.program_id(2)
    q_start = tl.load(cu_query_lens_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_query_lens_ptr + seq + 1).to(tl.int32) - q_start
    if m_block * BLOCK_M < q_len:
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        kv_head = head // GROUP
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        q_pos = ctx - q_len + rows
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first_row_pos = ctx - q_len + m_block * BLOCK_M
        hi = tl.minimum(first_row_pos + BLOCK_M, ctx)
        lo = 0
        if window > 0:
            lo = (tl.maximum(first_row_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            k_pos = n0 + tl.arange(0, BLOCK_N)
            kmask = k_pos < hi
            slot = paged_offsets(block_tables_ptr, stride_bt, seq, k_pos, kmask, PAGE, stride_cb, stride_cs,
                                 kv_head, stride_ch)
            kv_mask = kmask[:, None] & dmask[None, :]
            k = load_cached(k_cache_ptr, slot[:, None] + d[None, :], kv_mask, k_scale, q, FP8_CACHE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
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
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles and launch shape (benchmarks/prefill_attention.py sweeps them)."""

    block_m: int = 64  # query rows a program (16 for chunks of up to 32 tokens)
    block_n: int = 32  # keys a tile
    num_warps: int = 4
    num_stages: int = 2


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
    c = config or PrefillConfig(block_m=64 if max_query_len > 32 else 16)
    _prefill_kernel[(num_heads, num_seqs, triton.cdiv(max_query_len, c.block_m))](
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, out,
        seq_ids if seq_ids is not None else context_lens,  # unread unless INDEXED
        scale * LOG2E, window or 0, k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page, BLOCK_M=c.block_m, BLOCK_N=c.block_n, PRECISION=dot_precision(q.dtype),
        FP8_CACHE=k_cache.dtype == FP8, INDEXED=seq_ids is not None, num_warps=c.num_warps, num_stages=c.num_stages)
    return out
