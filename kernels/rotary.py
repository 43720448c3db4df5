"""Rotary position embedding, rotate-half layout (Llama/Mistral), applied to q and k in place.

For each head vector x = [x1 | x2] at position p, with cos/sin of the angles p * inv_freq:
    x <- [x1 cos - x2 sin | x2 cos + x1 sin]      (computed in float32, stored in x's dtype)
`cos_sin` is the [max_position, head_dim] float32 table: cos in the first half, sin in the second.
"""
from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_sin_ptr, stride_t, stride_h, NUM_HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + dims, mask=dmask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + dims, mask=dmask, other=0.0)[None, :]
    mask = (heads[:, None] < NUM_HEADS) & dmask[None, :]
    base = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


def _rotate_in_place(x, positions, cos_sin):
    num_tokens, num_heads, head_dim = x.shape
    assert x.stride(2) == 1
    _rotary_kernel[(num_tokens,)](x, positions, cos_sin, x.stride(0), x.stride(1), NUM_HEADS=num_heads,
                                  HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(num_heads),
                                  BLOCK_HALF=triton.next_power_of_2(head_dim // 2))


def rotary(positions, q, k, cos_sin):
    """Rotate q [num_tokens, heads, head_dim] and k [num_tokens, kv_heads, head_dim] in place."""
    _rotate_in_place(q, positions, cos_sin)
    _rotate_in_place(k, positions, cos_sin)
    return q, k
