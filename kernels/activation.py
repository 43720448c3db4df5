"""SiLU-and-multiply over a fused gate/up projection: out = silu(gate) * up, where the input
row is [gate | up]. Each product is rounded to the model dtype as the unfused code rounds it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WIDTH
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + WIDTH + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * WIDTH + offs, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x):
    num_tokens, double = x.shape
    width = double // 2
    out = torch.empty((num_tokens, width), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(width))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, block))](x, out, x.stride(0), WIDTH=width, BLOCK=block)
    return out
