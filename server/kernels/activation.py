"""SiLU-and-multiply over a fused gate/up projection: out = silu(gate) * up, where the input
row is [gate | up]. Each product is rounded to the model dtype as the unfused code rounds it.
The input may be a 4-bit product's deferred sums (int64, kernels/int4_gemv.py): read as values
in `dtype`, as finish_sums rounds them, and set back to zero."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.deferred import released, settle
from server.kernels.launch import LAUNCH, PDL, wait_for_inputs


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, WIDTH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WIDTH
    at = x_ptr + row * stride_x + offs
    gate = tl.load(at, mask=mask, other=0)
    up = tl.load(at + WIDTH, mask=mask, other=0)
    settle(gate)  # both halves in flight together
    gate = released(at, gate, mask, out_ptr.dtype.element_ty)
    up = released(at + WIDTH, up, mask, out_ptr.dtype.element_ty)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * WIDTH + offs, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_tiles(num_tokens: int) -> tuple[int, int]:
    """(inputs a program, warps): 256 on two warps for a decode step of up to 8 rows, whose
    time is the latency of a program's reads, so more and shorter programs (the fastest of the
    settings tried in 4-bit one-sequence decode of a Mistral-7B-shaped model on one H100,
    engines in one process, runs alternated; docs/kernels.md has the figures); else 1,024 on
    four."""
    return (256, 2) if num_tokens <= 8 else (1024, 4)


def silu_and_mul(x, dtype=None):
    """`dtype`: of the output where x holds deferred sums (else x's)."""
    num_tokens, double = x.shape
    width = double // 2
    out = torch.empty((num_tokens, width), dtype=dtype if x.dtype == torch.int64 else x.dtype, device=x.device)
    block, warps = silu_tiles(num_tokens)
    block = min(block, triton.next_power_of_2(width))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, block))](x, out, x.stride(0), WIDTH=width, BLOCK=block,
                                                                 PDL=PDL, num_warps=warps, **LAUNCH)
    return out
