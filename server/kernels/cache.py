"""Writing this step's K and V into their slots of the paged cache.

Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`, so a slot
(`block * block_size + offset`) holds `num_kv_heads * head_dim` contiguous values. A slot of
-1 marks a padding token (a CUDA-graph batch filled up to its captured size): nothing is written.
An fp8 (e4m3) cache stores clamp(k * (1 / k_scale), -448, 448) and v likewise, with one scale
per layer (the reciprocal rounded to float32 once, as the torch reference rounds it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from server.kernels.quant_reference import FP8, FP8_MAX


@triton.jit
def to_cache(x, inv_scale, cache_ptr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr):
    """K or V values as the cache stores them: an fp8 cache's clamped x / scale."""
    if QUANTIZE:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -FP8_MAX), FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v, k_inv_scale, v_inv_scale,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < WIDTH
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * WIDTH + offs, to_cache(k, k_inv_scale, k_cache_ptr, QUANTIZE, FP8_MAX), mask=mask)
        tl.store(v_cache_ptr + slot * WIDTH + offs, to_cache(v, v_inv_scale, v_cache_ptr, QUANTIZE, FP8_MAX), mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v may be strided views (of a fused QKV output) with contiguous heads."""
    num_tokens, kv_heads, head_dim = k.shape
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(1) == head_dim
    width = kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    1.0 / k_scale, 1.0 / v_scale, WIDTH=width, BLOCK=triton.next_power_of_2(width),
                                    QUANTIZE=k_cache.dtype == FP8, FP8_MAX=FP8_MAX)


@triton.jit
def load_cached(cache_ptr, offsets, mask, scale, like, FP8_CACHE: tl.constexpr):
    """A tile of K or V read from the paged cache, as `like`'s dtype: an fp8 cache's values
    times its layer's scale."""
    x = tl.load(cache_ptr + offsets, mask=mask, other=0.0)
    if FP8_CACHE:
        x = (x.to(tl.float32) * scale).to(like.dtype)
    return x


@triton.jit
def paged_offsets(block_tables_ptr, stride_bt, seq, pos, mask, PAGE: tl.constexpr, stride_cb, stride_cs,
                  kv_head, stride_ch):
    """Offsets into the paged cache of sequence `seq`'s positions `pos` (one KV head), through
    its block table."""
    block = tl.load(block_tables_ptr + seq * stride_bt + pos // PAGE, mask=mask, other=0)
    return block.to(tl.int64) * stride_cb + (pos % PAGE) * stride_cs + kv_head * stride_ch
