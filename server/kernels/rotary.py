"""Rotary position embedding (rotate-half layout, Llama/Mistral) fused with the KV-cache store.

For each head vector x = [x1 | x2] at position p, with cos/sin of the angles p * inv_freq:
    x <- [x1 cos - x2 sin | x2 cos + x1 sin]      (computed in float32, rounded to x's dtype)
`cos_sin` is the [max_position, head_dim] float32 table: cos in the first half, sin in the second.

One program per token and KV head rotates the query heads that share that KV head in place,
rotates k into its cache slot and copies v into its own: one launch where a decode step's layer
had three (rotate q, rotate k, store k and v), and each value is rounded exactly as that
sequence rounded it. k itself is left as it was: the attention kernels read every key from
the cache. The store follows server/kernels/cache.py (slot -1: a padding token, nothing stored; an
fp8 cache gets the clamped value times 1 / scale).

q, k and v may be a 4-bit product's deferred sums (int64, kernels/int4_gemv.py): they are read
as values in q_out's dtype, as finish_sums rounds them, and set back to zero; q then goes to
q_out rotated.

A decode step's rotation is a few programs whose time is the latency of their reads: the
position, slot and angles (the step's inputs, written before the forward starts) are read
before the wait for the kernel ahead (server/kernels/launch.py), q, k and v after it, all at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.cache import to_cache
from server.kernels.deferred import released, settle
from server.kernels.launch import LAUNCH, PDL, wait_for_inputs
from server.kernels.quant_reference import FP8, FP8_MAX


@triton.jit
def _rotate(x1, x2, cos, sin, dtype: tl.constexpr):
    """The two halves of head vectors, rotated, in `dtype`."""
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    return (a * cos - b * sin).to(dtype), (b * cos + a * sin).to(dtype)


@triton.jit
def _rotate_and_store_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
                             slot_ptr, stride_q, stride_k, stride_v, stride_qo, k_inv_scale, v_inv_scale,
                             GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_HALF: tl.constexpr, QUANTIZE: tl.constexpr,
                             FP8_MAX: tl.constexpr, PDL: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0)
    kv_head = tl.program_id(1)  # with the GROUP query heads that share it
    # the step's inputs and the table are written before the forward starts: read before the wait
    pos = tl.load(pos_ptr + token)
    slot = tl.load(slot_ptr + token)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < HALF
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + dims, mask=dmask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HALF + dims, mask=dmask, other=0.0)
    wait_for_inputs(PDL)

    g = tl.arange(0, BLOCK_G)[:, None]
    mask = (g < GROUP) & dmask
    heads = kv_head * GROUP + g
    offs = kv_head * HEAD_DIM + dims  # within a token's [kv_heads, head_dim]
    q_at = q_ptr + token * stride_q + heads * HEAD_DIM + dims
    k_at = k_ptr + token * stride_k + offs
    v_at = v_ptr + token * stride_v + offs
    # every read in flight at once; k and v are read even for a padding token (slot -1), whose
    # deferred sums are zeroed too
    q1, q2 = tl.load(q_at, mask=mask, other=0), tl.load(q_at + HALF, mask=mask, other=0)
    k1, k2 = tl.load(k_at, mask=dmask, other=0), tl.load(k_at + HALF, mask=dmask, other=0)
    v1, v2 = tl.load(v_at, mask=dmask, other=0), tl.load(v_at + HALF, mask=dmask, other=0)
    settle(q1)
    dtype: tl.constexpr = q_out_ptr.dtype.element_ty
    q1, q2 = _rotate(released(q_at, q1, mask, dtype), released(q_at + HALF, q2, mask, dtype), cos, sin, dtype)
    rotated = q_out_ptr + token * stride_qo + heads * HEAD_DIM + dims
    tl.store(rotated, q1, mask=mask)
    tl.store(rotated + HALF, q2, mask=mask)

    stored = dmask & (slot >= 0)
    cached = slot * (NUM_KV_HEADS * HEAD_DIM) + offs
    k1, k2 = _rotate(released(k_at, k1, dmask, dtype), released(k_at + HALF, k2, dmask, dtype), cos, sin, dtype)
    tl.store(k_cache_ptr + cached, to_cache(k1, k_inv_scale, k_cache_ptr, QUANTIZE, FP8_MAX), mask=stored)
    tl.store(k_cache_ptr + cached + HALF, to_cache(k2, k_inv_scale, k_cache_ptr, QUANTIZE, FP8_MAX), mask=stored)
    v1, v2 = released(v_at, v1, dmask, dtype), released(v_at + HALF, v2, dmask, dtype)
    tl.store(v_cache_ptr + cached, to_cache(v1, v_inv_scale, v_cache_ptr, QUANTIZE, FP8_MAX), mask=stored)
    tl.store(v_cache_ptr + cached + HALF, to_cache(v2, v_inv_scale, v_cache_ptr, QUANTIZE, FP8_MAX), mask=stored)


def rotate_and_store(positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping,
                     k_scale: float = 1.0, v_scale: float = 1.0, q_out=None):
    """Rotate q [num_tokens, heads, head_dim] into q_out (default: q itself, in place); rotate
    k and store it and v [num_tokens, kv_heads, head_dim] into their slots of the caches
    [num_blocks, block_size, kv_heads, head_dim]. q, k and v may be strided views (of a fused
    QKV output) with contiguous heads; deferred sums need a q_out. Returns the rotated q."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = q if q_out is None else q_out
    if q_out.dtype == torch.int64:
        raise ValueError("rotating deferred sums needs a q_out of the model dtype")
    for x in (q, k, v, q_out):
        assert x.stride(2) == 1 and x.stride(1) == head_dim
    group = num_heads // num_kv_heads
    if group * num_kv_heads != num_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} KV heads evenly")
    _rotate_and_store_kernel[(num_tokens, num_kv_heads)](
        q, k, v, q_out, positions, cos_sin, k_cache, v_cache, slot_mapping, q.stride(0), k.stride(0), v.stride(0),
        q_out.stride(0), 1.0 / k_scale, 1.0 / v_scale, GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        QUANTIZE=k_cache.dtype == FP8, FP8_MAX=FP8_MAX, PDL=PDL, **LAUNCH)
    return q_out
