"""LoRA updates of a batch whose rows use different adapters: out[i] += B[s](A[s] x[i]) with
s = slots[i] (no update where s < 0), in two launches a projection, or one where the product
is the decode kernel (server/kernels/gemv.py), which adds the update in its epilogue.

The rows are first put in order of their slot (`lora_rows`, device ops only: once a step, for
every projection), so that each adapter's rows are one run of the order. Then each program
takes one slot and a block of BLOCK_M of its rows, and multiplies them as a tile on the tensor
cores: an adapter's A and B are read once for each block of its rows, not once a row.
  - `lora_shrink`: t = x A[s]^T [rows, R], in `splits` partial sums over the inputs (one
    program a slot, block and split), so that a decode step of one row still spreads the read of
    A over many SMs; gated, x is [gate | up] and A multiplies silu(gate) * up, as the down
    projection's product does;
  - `lora_expand`: out[i, :] += (sum of t's splits) B[s]^T, one program a slot, block and run
    of output tiles, added in place; the runs are long enough that t's splits, summed once a
    program, are not read again for every tile (at 256 rows of eight adapters, a tile a
    program read t's 16 splits 96 times over for qkv alone);
  - `lora_epilogue`: the same update for a tile of a decode product's outputs, each row
    gathering its own slot's B, added to the product's float32 sums before they are rounded.
    A decode step with an adapter then has one launch a projection more than without, not two
    (and no launch of silu_and_mul for the down projection's update): the adapters' bytes are
    about 4 MB a Mistral-7B layer, so a one-sequence step pays mostly for the launches.
A merged projection (q, k, v) keeps its pieces' A stacked along R and their B block-diagonal,
so one shrink and one expand serve all of them. The slots are read on the device, so that a
captured CUDA graph serves any mix of adapters: what decode steps with adapters replay. Both
are launched as the forward's other kernels are (server/kernels/launch.py: placed while the
kernel ahead drains, each waiting for it before reading), so that they do not break the chain
of early launches twice a projection.

The torch reference is `lora_reference`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.launch import LAUNCH, PDL, wait_for_inputs
from server.kernels.precision import dot_precision


@dataclass
class LoRARows:
    """The rows of a step in order of their adapter slot: slot s's rows are
    order[starts[s]:starts[s + 1]] (rows of the base model, slot -1, come first, in no run)."""

    order: torch.Tensor  # [rows] int64
    starts: torch.Tensor  # [slots + 1] int64


@dataclass
class LoRAUpdate:
    """A projection's adapter update for the step under way, its shrink done: t [splits, n, R]
    (float32 partial sums of A[s] x), B [slots, N, R], the rows by slot and each row's slot
    [n] (-1: none). A product that can add it in its own epilogue (gemv) takes it whole;
    any other adds it after with `add_to`."""

    t: torch.Tensor
    b: torch.Tensor
    rows: LoRARows
    row_slots: torch.Tensor

    def add_to(self, out: torch.Tensor) -> torch.Tensor:
        return lora_expand(self.t, self.b, self.rows, out)


def lora_rows(row_slots: torch.Tensor, num_slots: int) -> LoRARows:
    """Each row's slot [rows] (-1: none) -> the rows by slot, with device ops only (no host
    read: a graph captures it)."""
    ordered, order = torch.sort(row_slots, stable=True)
    bounds = torch.arange(num_slots + 1, dtype=ordered.dtype, device=ordered.device)
    return LoRARows(order, torch.searchsorted(ordered, bounds))


@triton.jit
def _slot_block(order_ptr, starts_ptr, BLOCK_M: tl.constexpr):
    """This program's slot, its block of rows (their indices), which of them exist, and whether
    any does (most programs of a step have none: their slot has fewer rows, or none)."""
    slot = tl.program_id(0)
    end = tl.load(starts_ptr + slot + 1)
    first = tl.load(starts_ptr + slot) + tl.program_id(1) * BLOCK_M
    m = first + tl.arange(0, BLOCK_M)
    valid = m < end
    return slot, tl.load(order_ptr + m, mask=valid, other=0), valid, first < end


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, order_ptr, starts_ptr, t_ptr, in_features, rank, split_len,
                   stride_x, stride_a_slot, stride_a_rank, stride_t_split, stride_t,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                   GATED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)  # the rows' order is made in the forward, like x
    slot, rows, valid, live = _slot_block(order_ptr, starts_ptr, BLOCK_M)
    if live:
        split = tl.program_id(2)
        r = tl.arange(0, BLOCK_R)
        first = split * split_len
        last = tl.minimum(first + split_len, in_features)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(first, last, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < last
            x_ptrs = x_ptr + rows[:, None] * stride_x + k[None, :]
            x = tl.load(x_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
            if GATED:  # x is [gate | up]: silu(gate) * up, rounded as the gated products round it
                up = tl.load(x_ptrs + in_features, mask=valid[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                g = x.to(tl.float32)
                x = ((g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32) * up).to(x.dtype)
            a = tl.load(a_ptr + slot * stride_a_slot + r[None, :] * stride_a_rank + k[:, None],
                        mask=kmask[:, None] & (r[None, :] < rank), other=0.0)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        tl.store(t_ptr + split * stride_t_split + rows[:, None] * stride_t + r[None, :], acc,
                 mask=valid[:, None] & (r[None, :] < rank))


@triton.jit
def _expand_kernel(t_ptr, b_ptr, order_ptr, starts_ptr, out_ptr, out_features, rank, splits, tiles_per_program,
                   stride_t_split, stride_t, stride_b_slot, stride_b_out, stride_out,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                   PDL: tl.constexpr):
    wait_for_inputs(PDL)
    slot, rows, valid, live = _slot_block(order_ptr, starts_ptr, BLOCK_M)
    if live:
        r = tl.arange(0, BLOCK_R)
        tmask = valid[:, None] & (r[None, :] < rank)
        t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for split in range(0, splits):
            t += tl.load(t_ptr + split * stride_t_split + rows[:, None] * stride_t + r[None, :], mask=tmask, other=0.0)
        t = t.to(b_ptr.dtype.element_ty)
        first = tl.program_id(2) * tiles_per_program * BLOCK_N
        last = tl.minimum(first + tiles_per_program * BLOCK_N, out_features)
        for n0 in range(first, last, BLOCK_N):  # this program's run of output tiles, t read once for all
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < last
            b = tl.load(b_ptr + slot * stride_b_slot + n[None, :] * stride_b_out + r[:, None],
                        mask=(r[:, None] < rank) & nmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            update = tl.dot(t, b, input_precision=PRECISION)
            mask = valid[:, None] & nmask[None, :]
            where = out_ptr + rows[:, None] * stride_out + n[None, :]
            old = tl.load(where, mask=mask, other=0.0)
            tl.store(where, (old.to(tl.float32) + update).to(old.dtype), mask=mask)


@triton.jit
def lora_epilogue(rows, rmask, cols, cmask, t_ptr, b_ptr, slots_ptr, rank, t_splits, stride_t_split, stride_t,
                  stride_b_slot, stride_b_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, T_SPLITS: tl.constexpr):
    """The update [BLOCK_M, BLOCK_N] float32 of a product's tile (`rows` of its batch, `cols`
    of its outputs): sum over r of t[row, r] * B[slot of row, col, r], t's splits summed, zero
    where a row has no slot. Each row gathers its own slot's B, so a tile's rows may mix
    adapters; R is walked R_CHUNK at a time (registers: BLOCK_M * BLOCK_N * R_CHUNK)."""
    slot = tl.load(slots_ptr + rows, mask=rmask, other=-1)
    live = rmask & (slot >= 0)
    b_rows = b_ptr + tl.maximum(slot, 0).to(tl.int64)[:, None, None] * stride_b_slot \
        + cols[None, :, None].to(tl.int64) * stride_b_out
    splits = tl.arange(0, T_SPLITS)
    update = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, BLOCK_R, R_CHUNK):  # a loop, not unrolled: a tile of 16 rows may take 64 chunks
        r = r0 + tl.arange(0, R_CHUNK)
        rmask_r = r < rank
        t = tl.load(t_ptr + splits[:, None, None] * stride_t_split + rows[None, :, None] * stride_t + r[None, None, :],
                    mask=(splits < t_splits)[:, None, None] & live[None, :, None] & rmask_r[None, None, :], other=0.0)
        b = tl.load(b_rows + r[None, None, :], mask=live[:, None, None] & cmask[None, :, None] & rmask_r[None, None, :],
                    other=0.0)
        update += tl.sum(tl.sum(t, axis=0)[:, None, :] * b.to(tl.float32), axis=2)
    return update


def epilogue_chunk(block_m: int, block_n: int, block_r: int) -> int:
    """lora_epilogue's R_CHUNK: at most 2,048 products of a tile at once (each with its own
    64-bit address: at 8,192 a 16-row tile of qkv took 254 registers a thread, not 80)."""
    return max(1, min(block_r, 2048 // (block_m * block_n)))


EXPAND_PROGRAMS = 264  # twice an H100's SMs: enough programs with rows to keep them all busy
MAX_RUN = 8  # tiles a program walks at most (a prefill's rows keep many programs busy, each tile in flight)


def _block_m(rows: int) -> int:
    return 16 if rows <= 64 else 32 if rows <= 512 else 64


def block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # a tensor-core product's inner size is 16 at least


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: LoRARows, splits: int | None = None,
                gated: bool = False) -> torch.Tensor:
    """x [n, in], a [slots, R, in] -> t [splits, n, R] float32: partial sums of A[s] x over
    `splits` runs of the inputs (by default, enough programs to spread a small step's read).
    Rows of no slot are left unwritten. gated: x is [n, 2 in] = [gate | up], and A multiplies
    silu(gate) * up (a gated down projection's real input)."""
    if x.stride(1) != 1:  # the kernel walks the inputs with unit stride
        x = x.contiguous()
    n, in_features = x.shape[0], x.shape[1] // (2 if gated else 1)
    if in_features != a.shape[2]:
        twice = " (gated: twice that)" if gated else ""
        raise ValueError(f"x has {x.shape[1]} columns for an A of {a.shape[2]} inputs{twice}")
    num_slots, rank = a.shape[0], a.shape[1]
    block_m, block_k = _block_m(n), 64
    blocks = triton.cdiv(n, block_m)
    if splits is None:
        splits = max(1, min(triton.cdiv(in_features, 256), 128 // blocks))
    split_len = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    splits = triton.cdiv(in_features, split_len)
    t = torch.empty(splits, n, rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_slots, blocks, splits)](
        x, a, rows.order, rows.starts, t, in_features, rank, split_len, x.stride(0), a.stride(0), a.stride(1),
        t.stride(0), t.stride(1), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r(rank),
        PRECISION=dot_precision(x.dtype), GATED=gated, PDL=PDL, **LAUNCH)
    return t


def lora_expand(t: torch.Tensor, b: torch.Tensor, rows: LoRARows, out: torch.Tensor,
                tile_runs: int | None = None) -> torch.Tensor:
    """out [n, N] (a view with unit column stride) += B[s] (t's splits summed), in place; b [slots, N, R].
    Each program sums its rows' t once and walks a run of output tiles: `tile_runs` runs over
    N (by default, about EXPAND_PROGRAMS programs with rows, however the rows fall into slots,
    and runs of MAX_RUN tiles at most)."""
    n, out_features = out.shape
    num_slots, rank = b.shape[0], b.shape[2]
    block_m, block_n = _block_m(n), 64 if out_features <= 8192 else 128
    blocks, tiles = triton.cdiv(n, block_m), triton.cdiv(out_features, block_n)
    if tile_runs is None:  # (slot, block)s that can hold rows: the blocks, and one more at each change of slot
        pairs = min(blocks + min(num_slots, n) - 1, num_slots * blocks)
        tile_runs = max(1, min(tiles, max(EXPAND_PROGRAMS // pairs, triton.cdiv(tiles, MAX_RUN))))
    per_run = triton.cdiv(tiles, tile_runs)
    _expand_kernel[(num_slots, blocks, triton.cdiv(tiles, per_run))](
        t, b, rows.order, rows.starts, out, out_features, rank, t.shape[0], per_run, t.stride(0), t.stride(1),
        b.stride(0), b.stride(1), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r(rank),
        PRECISION=dot_precision(b.dtype), PDL=PDL, **LAUNCH)
    return out


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """What lora_shrink then lora_expand compute, in torch (float32 sums), a slot at a time."""
    update = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for slot in range(a.shape[0]):
        rows = slots == slot
        update[rows] = (x[rows].float() @ a[slot].float().T) @ b[slot].float().T
    out.copy_((out.float() + update).to(out.dtype))
    return out
