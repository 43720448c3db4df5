"""LoRA updates of a batch whose rows use different adapters: out[i] += B[s](A[s] x[i]) with
s = slots[i] (no update where s < 0), in two launches a projection.

`lora_shrink`: t [rows, R] = A[s] x for each row, A [slots, R, in]; one program a row, the
input walked in tiles. `lora_expand`: out[i, :] += B[s] t[i] for each row, B [slots, out, R];
one program a row and a tile of outputs. A merged projection (q, k, v) keeps its pieces' A
stacked along R and their B block-diagonal, so one shrink and one expand serve all of them.
The slots are read on the device, so that a captured CUDA graph serves any mix of adapters:
this is what decode steps with adapters replay. Sums in float32.

The torch reference is `lora_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, t_ptr, in_features, rank, stride_x, stride_a_slot, stride_a_rank,
                   stride_t, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_x + k, mask=k < in_features, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_a_slot + r[:, None] * stride_a_rank + k[None, :],
                        mask=(r[:, None] < rank) & (k[None, :] < in_features), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(t_ptr + row * stride_t + r, acc, mask=r < rank)


@triton.jit
def _expand_kernel(t_ptr, b_ptr, slots_ptr, out_ptr, out_features, rank, stride_t, stride_b_slot, stride_b_out,
                   stride_out, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        t = tl.load(t_ptr + row * stride_t + r, mask=r < rank, other=0.0)
        b = tl.load(b_ptr + slot * stride_b_slot + n[:, None] * stride_b_out + r[None, :],
                    mask=(n[:, None] < out_features) & (r[None, :] < rank), other=0.0).to(tl.float32)
        update = tl.sum(b * t[None, :], axis=1)
        mask = n < out_features
        old = tl.load(out_ptr + row * stride_out + n, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_out + n, (old.to(tl.float32) + update).to(old.dtype), mask=mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [rows, in], a [slots, R, in], slots [rows] int64 -> t [rows, R] float32."""
    rows, in_features = x.shape
    rank = a.shape[1]
    t = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(rows,)](x, a, slots, t, in_features, rank, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
                            BLOCK_K=256, BLOCK_R=triton.next_power_of_2(rank))
    return t


def lora_expand(t: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [rows, N] (a view with unit column stride) += B[slots] t, in place; b [slots, N, R]."""
    rows, out_features = out.shape
    rank = b.shape[2]
    block = 64
    _expand_kernel[(rows, triton.cdiv(out_features, block))](
        t, b, slots, out, out_features, rank, t.stride(0), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_N=block, BLOCK_R=triton.next_power_of_2(rank))
    return out


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """What lora_shrink then lora_expand compute, in torch (float32 sums)."""
    used = slots >= 0
    index = slots.clamp(min=0)
    t = torch.einsum("ri,rki->rk", x.float(), a[index].float())  # [rows, R]
    update = torch.einsum("rk,rnk->rn", t, b[index].float()) * used[:, None]
    out.copy_((out.float() + update).to(out.dtype))
    return out
