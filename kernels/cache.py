"""Writing this step's K and V into their slots of the paged cache.

Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`, so a slot
(`block * block_size + offset`) holds `num_kv_heads * head_dim` contiguous values. A slot of
-1 marks a padding token (a CUDA-graph batch filled up to its captured size): nothing is written.
"""
from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < WIDTH
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * WIDTH + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * WIDTH + offs, v, mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v may be strided views (of a fused QKV output) with contiguous heads."""
    num_tokens, kv_heads, head_dim = k.shape
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(1) == head_dim
    width = kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    WIDTH=width, BLOCK=triton.next_power_of_2(width))
