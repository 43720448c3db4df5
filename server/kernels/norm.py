"""RMSNorm with the residual add fused in: one read of x and the residual, one write of each.

    s = x + residual            (rounded to the model dtype, as the unfused code does)
    y = weight * dtype(s * rsqrt(mean(s^2) + eps))   (the norm in float32)

x may be a 4-bit product's deferred sums (int64, kernels/int4_gemv.py): read as values in the
model dtype (`dtype`), as finish_sums rounds them, and set back to zero.

A norm of a decode step is one program a row, and its time is the latency of its reads: the
weight (a constant) is read before the wait for the kernel ahead (server/kernels/launch.py), x and
the residual after it, together.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.deferred import released, settle
from server.kernels.launch import LAUNCH, PDL, wait_for_inputs


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_r,
                    eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    PDL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)  # a constant: read before the wait
    wait_for_inputs(PDL)
    at = x_ptr + row * stride_x + offs
    x = tl.load(at, mask=mask, other=0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
    settle(x)  # x and the residual in flight together
    x = released(at, x, mask, out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * HIDDEN + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)
    normed = (x32 * rstd).to(x.dtype)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + offs, y.to(x.dtype), mask=mask)


def norm_warps(num_tokens: int, hidden: int) -> int:
    """Warps a row: 16 for a wide row of a decode step of up to 8 sequences, where each of the
    step's norms is one program or a few and its time is the step's (faster than 8 in 4-bit
    one-sequence decode of a Mistral-7B-shaped model on one H100, two engines in one process,
    runs alternated; docs/kernels.md has the figures); else 8 for a wide row, 4 for a narrow
    one."""
    if hidden >= 4096:
        return 16 if num_tokens <= 8 else 8
    return 4


def rmsnorm(x, weight, eps, residual=None, dtype=None):
    """x [num_tokens, hidden] (rows may be strided); same results as the reference. `dtype`:
    of the outputs where x holds deferred sums (else x's)."""
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=dtype if x.dtype == torch.int64 else x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    _rmsnorm_kernel[(num_tokens,)](
        x, residual if residual is not None else x, weight, out, residual_out,
        x.stride(0), residual.stride(0) if residual is not None else 0, eps,
        HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), HAS_RESIDUAL=residual is not None, PDL=PDL,
        num_warps=norm_warps(num_tokens, hidden), **LAUNCH)
    return out if residual is None else (out, residual_out)
