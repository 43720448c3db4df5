"""Paged attention for decode steps (one query token per sequence), split along the context.

Flash-decoding: the context of each sequence is cut into `num_splits` ranges; program
(seq, kv_head, split) reads its range of K/V once through the block table, for all the query
heads that share that KV head (GQA), and keeps an online softmax (running max m, sum l, and
the weighted sum of V). A second kernel merges the splits by their log-sum-exps:
    out = sum_s exp(lse_s - max lse) * out_s / sum_s exp(lse_s - max lse)
The number of splits depends only on the batch shape, never on the contexts, so a decode step
can be captured in a CUDA graph and replayed with other contexts. It is an argument of both
kernels, not a compile-time constant: the one-token sequences of mixed steps (run without
graphs) come in every number, each with its split count, and each count was a variant
compiled when first met (the 256-request workload's first run on a fresh H100 compiled six
of the split kernel and three of the merge; docs/kernels.md has what that cost). A sequence
with context 0 (a padding row of a captured batch) gets zeros.

The KV head is the grid's first axis, so that the GPU dispatches a sequence's programs one
after another (they read the same cache rows, where each token's heads lie side by side),
and the sequences in the order given: the engine gives them longest context first
(ModelRunner._pack), so that no long program starts last. The KV head first, and then the
longest first too, each read the K/V faster on an H100 (benchmarks/kernel_bench/decode_attention.py;
docs/kernels.md has the figures).

An fp8 cache is read as k_cache * k_scale (and v likewise): its e4m3 tiles widen to fp16
exactly, one instruction for two values, and are multiplied in fp16 with q in fp16 (which
holds bf16 values exactly from 2^-14 to 65,504 in magnitude; a query past that, unseen in
practice, would overflow); the scales multiply the sums (scores, and the weighted sum of V).
On an H100 this reads the cache faster than widening each value to float32, scaling it and
rounding it to bf16 (benchmarks/kernel_bench/decode_attention.py --fp8-cache; docs/kernels.md has
the figures).

A decode step of a few sequences is latency: its programs start before the kernel ahead (the
rotary kernel that stores the newest K/V) has finished (server/kernels/launch.py) and read what they
can before waiting for it: the step's inputs, and (EARLY_SEQS) the first tile of their keys
and values but the newest token's. That made 4-bit one-sequence decode of a Mistral-7B-shaped
model faster on an H100 (engines in one process, runs alternated; docs/kernels.md).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.cache import paged_offsets
from server.kernels.launch import LAUNCH, PDL, wait_for_inputs
from server.kernels.precision import LOG2E, dot_precision
from server.kernels.quant_reference import FP8


@triton.jit
def sequence_and_row(index, seq_ids_ptr, cu_query_ptr, INDEXED: tl.constexpr):
    """The sequence a launch's `index`-th program takes, and its query's row of q: the same
    in a decode step; in a mixed step (INDEXED) the index-th of `seq_ids`, whose one token
    starts at its cu_query_lens."""
    if INDEXED:
        seq = tl.load(seq_ids_ptr + index).to(tl.int32)
        row = tl.load(cu_query_ptr + seq).to(tl.int32)
    else:
        seq = index
        row = index
    return seq, row


@triton.jit
def _attend(q, k, v, pmask, m, l, acc, scale_log2, PRECISION: tl.constexpr):
    """One tile of keys k and values v [BLOCK_N, BLOCK_D] (pmask: those that count) into the
    online softmax (m, l, acc) of the query heads q [BLOCK_G, BLOCK_D]."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N], in log2 units
    s = tl.where(pmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr, part_lse_ptr, out_ptr,
        seq_ids_ptr, cu_query_ptr,
        scale_log2, window, k_scale, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb,
        stride_cs, stride_ch, num_splits, fresh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
        FP8_CACHE: tl.constexpr, INDEXED: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr):
    # Before the wait for the kernel ahead (server/kernels/launch.py): the step's inputs (written
    # before the forward starts) and, with EARLY, the first tile of this split's keys and
    # values but the newest `fresh` tokens', which the kernel ahead stores (a decode row's own;
    # a row of speculation's checks, up to its sequence's tokens of the step before it); every
    # other cached token was stored by an earlier step.
    kv_head = tl.program_id(0)
    index = tl.program_id(1)  # of the sequence among those this launch takes
    seq, row = sequence_and_row(index, seq_ids_ptr, cu_query_ptr, INDEXED)
    split = tl.program_id(2)
    num_heads = tl.num_programs(0) * GROUP
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    start = 0
    if window > 0:
        start = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    # the tiles' dtype: q's, or fp16 over an fp8 cache (the module's docstring)
    dtype: tl.constexpr = tl.float16 if FP8_CACHE and q_ptr.dtype.element_ty != tl.float32 else q_ptr.dtype.element_ty
    if EARLY:
        pos = lo + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        slot = paged_offsets(block_tables_ptr, stride_bt, seq, pos, pmask, PAGE, stride_cb, stride_cs, kv_head,
                             stride_ch)
        at = slot[:, None] + d[None, :]
        cached = pmask[:, None] & dmask[None, :]
        newest = cached & (pos >= ctx - fresh)[:, None]
        older = cached & (pos < ctx - fresh)[:, None]
        # [BLOCK_N, BLOCK_D], held in the cache's dtype until used: an fp8 tile widened here
        # took 255 registers a lane and spilled (sm_90), 128 tokens wide
        k = tl.load(k_cache_ptr + at, mask=older, other=0.0)
        v = tl.load(v_cache_ptr + at, mask=older, other=0.0)
    wait_for_inputs(PDL)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(dtype)  # [BLOCK_G, BLOCK_D]
    if FP8_CACHE:
        scale_log2 *= k_scale
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = lo
    if EARLY:
        k = tl.where(newest, tl.load(k_cache_ptr + at, mask=newest, other=0.0), k).to(dtype)
        v = tl.where(newest, tl.load(v_cache_ptr + at, mask=newest, other=0.0), v).to(dtype)
        if hi > lo:
            m, l, acc = _attend(q, k, v, pmask, m, l, acc, scale_log2, PRECISION)
        first += BLOCK_N
    for n0 in range(first, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        slot = paged_offsets(block_tables_ptr, stride_bt, seq, pos, pmask, PAGE, stride_cb, stride_cs,
                             kv_head, stride_ch)
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0).to(dtype)
        v = tl.load(v_cache_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0).to(dtype)
        m, l, acc = _attend(q, k, v, pmask, m, l, acc, scale_log2, PRECISION)
    has_keys = hi > lo
    if FP8_CACHE:
        acc *= v_scale
    out = tl.where(has_keys, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    if ONE_SPLIT:  # the whole context: the output itself, no merge
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        part = (index * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=gmask[:, None] & dmask[None, :])
        tl.store(part_lse_ptr + part, lse, mask=gmask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, seq_ids_ptr, cu_query_ptr, stride_ot, stride_oh,
                         num_splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         INDEXED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    index = tl.program_id(0)
    head = tl.program_id(1)
    _, out_row = sequence_and_row(index, seq_ids_ptr, cu_query_ptr, INDEXED)
    row = index * tl.num_programs(1) + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(smask, tl.exp2(lse - safe_top), 0.0)
    total = tl.sum(weight, axis=0)
    parts = tl.load(part_out_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=smask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + out_row * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


# Up to this many sequences, a program reads its first tile before its wait. Such a step is a
# few programs whose time is the latency of their reads; the tile held in registers takes a
# program from 96 registers a lane to 217 (sm_90), which would cut a large batch's programs an
# SM from five to two, where its reads need them all.
EARLY_SEQS = 8
# The widest tile such a program holds: an fp8 cache's 128-token tiles held across the wait took
# 255 registers a lane and spilled 432 bytes (sm_90); 64 tokens do not.
EARLY_BLOCK_N = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch shape of the split kernel (benchmarks/kernel_bench/decode_attention.py sweeps them)."""

    block_n: int = 64  # context tokens per tile
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, fp8_cache: bool = False, programs_per_sm: float | None = None,
                   shared_memory: int = 0) -> DecodeConfig:
    """64-token tiles two deep (32 for heads over 128); over an fp8 cache 128-token tiles three
    deep, the fastest in benchmarks/kernel_bench/decode_attention.py's sweep on an H100.

    A bf16 launch of one split with at most 8 programs an SM (`programs_per_sm`: 33-132
    sequences of 8 KV heads on an H100) takes 128-token tiles when `shared_memory` (an SM's,
    for one program) holds two of K's and V's: its one or two programs an SM then keep more
    reads in flight than five with 64-token tiles. In the sweep (contexts longest first, as the
    engine passes them) 128-token tiles read faster at 64-128 sequences and 64-token ones at
    160, where 64 stays. docs/kernels.md has the sweep."""
    if fp8_cache and head_dim <= 128:
        return DecodeConfig(block_n=128, num_stages=3)
    wide = DecodeConfig(block_n=128)
    wide_stages_bytes = wide.num_stages * 2 * wide.block_n * 128 * 2  # K and V tiles of bf16, heads <= 128
    if head_dim <= 128 and programs_per_sm is not None and programs_per_sm <= 8 and \
            shared_memory >= wide_stages_bytes:
        return wide
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32)


@functools.cache
def device_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory a program may take) of a CUDA device; (1, 0) elsewhere."""
    if device.type != "cuda":
        return 1, 0
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.shared_memory_per_block_optin


MAX_SPLITS = 32  # the merge kernel's tile of splits; more take a larger one (a variant of their own)


def kernel_choice(num_seqs: int, num_kv_heads: int, num_splits: int, head_dim: int, fp8_cache: bool,
                  device: torch.device) -> tuple[DecodeConfig, bool]:
    """The split kernel's tiles for a launch, and whether its programs read their first tile
    before their wait (EARLY). With whether it is one split and whether it is indexed, that is
    what picks the compiled variant a launch runs (the split count itself is an argument; the
    alignment of pointers and the block tables' stride aside): ModelRunner.warm_up compiles
    each variant a mixed step can take before the first request."""
    sms, shared_memory = device_limits(device)
    programs_per_sm = num_seqs * num_kv_heads / sms if num_splits == 1 else None
    early = num_seqs <= EARLY_SEQS
    config = default_config(head_dim, fp8_cache, programs_per_sm, shared_memory)
    if early and config.block_n > EARLY_BLOCK_N:  # the first tile held in registers across the wait
        config = dataclasses.replace(config, block_n=EARLY_BLOCK_N)
    return config, early


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                     window: int | None, num_splits: int, out=None, k_scale: float = 1.0, v_scale: float = 1.0,
                     config: DecodeConfig | None = None, seq_ids=None, cu_query_lens=None, fresh: int = 1):
    """q [num_seqs, heads, head_dim] -> [num_seqs, heads, head_dim]; block_tables [num_seqs,
    max_blocks] and context_lens [num_seqs] are integer tensors on the device. With one split
    (a batch large enough to fill the GPU without splitting) the split kernel writes the output
    itself and the merge is not launched.

    In a mixed step, `seq_ids` picks the sequences of one token (q then holds every token of the
    step, sequence i's from cu_query_lens[i]); their rows of `out` are written, no others.
    `fresh`: how many of the newest tokens of a row's context this step stores (the decode
    graphs replayed a row a token, as speculation's checks run, store up to their query
    length): programs that start before the storing kernel finishes read those after it."""
    num_heads, head_dim = q.shape[1:]
    indexed = seq_ids is not None
    if indexed and (out is None or cu_query_lens is None):
        raise ValueError("decode_attention over some sequences of a step takes their cu_query_lens and out")
    num_seqs = seq_ids.shape[0] if indexed else q.shape[0]
    ids = (seq_ids, cu_query_lens) if indexed else (context_lens, context_lens)  # unread unless indexed
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    chosen, early = kernel_choice(num_seqs, num_kv_heads, num_splits, head_dim, k_cache.dtype == FP8, q.device)
    c = config or chosen
    if out is None:
        out = torch.empty_like(q)
    part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim) if num_splits > 1 else (0,),
                           dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_seqs, num_heads, num_splits) if num_splits > 1 else (0,),
                           dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    _decode_split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, out, *ids,
        scale * LOG2E, window or 0, k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_splits, fresh,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, BLOCK_N=c.block_n, ONE_SPLIT=num_splits == 1, PRECISION=dot_precision(q.dtype),
        FP8_CACHE=k_cache.dtype == FP8, INDEXED=indexed, EARLY=early, PDL=PDL,
        num_warps=c.num_warps, num_stages=c.num_stages, **LAUNCH)
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, *ids, out.stride(0), out.stride(1), num_splits, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(max(num_splits, MAX_SPLITS)), INDEXED=indexed, PDL=PDL,
            **LAUNCH)
    return out
