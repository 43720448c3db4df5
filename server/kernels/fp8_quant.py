"""Dynamic per-token fp8 quantization of activations, before an fp8 matmul: one program per
row reads it once, takes its largest magnitude, and writes the row in e4m3 with its scale:
    scale = max(amax(|x|) / 448, 1e-12),   q = clamp(x / scale, -448, 448) in e4m3
(the same math as `quantize_fp8_rows` in server/kernels/quant_reference.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.quant_reference import FP8, FP8_MAX, FP8_MIN_SCALE


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, K: tl.constexpr, BLOCK: tl.constexpr,
                          FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) * (1.0 / FP8_MAX), MIN_SCALE)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) -> (q [M, K] e4m3, scale [M, 1] float32, as _scaled_mm takes it)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _quantize_rows_kernel[(M,)](x, q, scale, x.stride(0), K=K, BLOCK=block, FP8_MAX=FP8_MAX,
                                MIN_SCALE=FP8_MIN_SCALE, num_warps=8 if block >= 4096 else 4)
    return q, scale
