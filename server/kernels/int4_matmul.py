"""4-bit weights (AWQ and GPTQ, held in one layout) times 16-bit activations.

Weights as server/kernels/quant_reference.py describes "ours": qweight [K/8, N] int32 (input 8r + i
in bits 4i..4i+3 of word r), zeros [G, N] uint8, scales [G, N] and, when the inputs of a group
are not consecutive, g_idx [K] (the group of each input). Then
    out[m, n] = sum_k x[m, k] * (q[k, n] - zeros[g(k), n]) * scales[g(k), n].

`int4_matmul`: program (m block, n block, k split) walks its share of K in BLOCK_K tiles. Per
tile it reads BLOCK_K/8 x BLOCK_N words, unpacks them to BLOCK_K x BLOCK_N nibbles,
dequantizes in float32 (exact, as in the reference), rounds to x's dtype and multiplies on the
tensor cores. With consecutive groups and BLOCK_K dividing group_size, a tile lies in one group
and reads one row of scales and zeros. Decode reads every weight once for few rows of x, so
it is bound by memory: K is split until there are a few programs per SM, and the splits'
float32 partial sums are added at the end (the number of splits is an argument, not a
compile-time constant, so that the batch sizes of the CUDA graphs share a few compilations).
The m blocks of one n block are neighbours in the launch order, so they share its words
through the L2 cache.

`int4_dequantize` writes the dense [K, N] matrix in x's dtype, for batches so large that one
dequantization is cheap next to the matmul (prefill).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.precision import dot_precision


@triton.jit
def _dequantized_tile(qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, k0, cols, cmask, N,
                      GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weights k0 .. k0 + BLOCK_K of the columns `cols`, float32 [BLOCK_K, BLOCK_N]."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qweight_ptr + words[:, None] * N + cols[None, :], mask=cmask[None, :], other=0)
    shifts = tl.arange(0, 8) * 4
    q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
    if HAS_G_IDX:
        groups = tl.load(g_idx_ptr + k0 + tl.arange(0, BLOCK_K))
        at = groups[:, None] * N + cols[None, :]
        z = tl.load(zeros_ptr + at, mask=cmask[None, :], other=0)
        s = tl.load(scales_ptr + at, mask=cmask[None, :], other=0.0)
    else:
        at = (k0 // GROUP_SIZE) * N + cols
        z = tl.load(zeros_ptr + at, mask=cmask, other=0)[None, :]
        s = tl.load(scales_ptr + at, mask=cmask, other=0.0)[None, :]
    return (q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _int4_matmul_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, N, K, stride_xm, split_k,
                        GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    per_split = tl.cdiv(K // BLOCK_K, split_k) * BLOCK_K
    lo = split * per_split
    hi = tl.minimum(lo + per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rmask[:, None], other=0.0)
        w = _dequantized_tile(qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, k0, cols, cmask, N,
                              GROUP_SIZE, HAS_G_IDX, BLOCK_K, BLOCK_N)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    out = out_ptr + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _int4_dequantize_kernel(qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N,
                            GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = _dequantized_tile(qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, k0, cols, cmask, N,
                          GROUP_SIZE, HAS_G_IDX, BLOCK_K, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + ks[:, None] * N + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=cmask[None, :])


def tile_k(K: int, group_size: int, largest: int = 128) -> int:
    """The largest tile of K (at most `largest`, a power of two) that divides K and lies inside
    one group."""
    block = largest
    while K % block or group_size % block:
        block //= 2
    if block < 16:
        raise ValueError(f"4-bit weights need K ({K}) and the group size ({group_size}) to be multiples of 16")
    return block


def int4_matmul(x, qweight, zeros, scales, g_idx, group_size: int, num_sms: int = 132):
    """x [M, K] (contiguous rows) -> [M, N] in x's dtype. g_idx None: input k is in group
    k // group_size."""
    M, K = x.shape
    N = qweight.shape[1]
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if M <= 32 else 128
    block_k = tile_k(K, group_size)
    grid_mn = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = max(1, min(K // block_k, triton.cdiv(4 * num_sms, grid_mn)))
    out = torch.empty((split_k, M, N), dtype=torch.float32 if split_k > 1 else x.dtype, device=x.device)
    _int4_matmul_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)](
        x, qweight, zeros, scales, g_idx if g_idx is not None else qweight, out, M, N, K, x.stride(0), split_k,
        GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION=dot_precision(x.dtype),
        num_warps=4 if block_m * block_n <= 2048 else 8, num_stages=3)
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)


def int4_dequantize(qweight, zeros, scales, g_idx, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [K, N] in `dtype`."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    block_k, block_n = tile_k(K, group_size), 128
    out = torch.empty((K, N), dtype=dtype, device=qweight.device)
    _int4_dequantize_kernel[(K // block_k, triton.cdiv(N, block_n))](
        qweight, zeros, scales, g_idx if g_idx is not None else qweight, out, N,
        GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None, BLOCK_K=block_k, BLOCK_N=block_n)
    return out
