"""Decode's matrix products: y = x @ W^T for a few rows of x and an nn.Linear weight.

x [M, K] (M at most MAX_ROWS, a decode step's batch; each row contiguous), W [N, K] (rows
contiguous), y [M, N] in x's dtype:
    y[m, n] = sum_k x[m, k] * W[n, k]        (float32 sums; the reference is F.linear)
A decode step reads every weight once for a handful of rows, so its time is the time to read
W: the kernel is shaped for the rate at which W streams in, not for arithmetic.

Program (n block, k split) owns BLOCK_N rows of W and walks its share of their K columns in
[BLOCK_N, BLOCK_K] tiles, each tile row one contiguous run (16-byte loads). The walk is
software-pipelined NUM_STAGES deep (asynchronous copies into shared memory, also without a
dot in the loop), which keeps enough bytes in flight per SM. Each tile is multiplied either
  - in float32 multiply-adds into a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator that is summed
    over K once, after the loop (no reduction inside it: the cheapest for one or two rows), or
  - on the tensor cores, as the tile times x's tile transposed (rows padded to 16): the
    weight is the product's left operand, [BLOCK_N, 16] = [BLOCK_N, BLOCK_K] @ [BLOCK_K, 16],
    which Hopper multiplies straight from shared memory (wgmma) once BLOCK_N is 64 or more;
    it reads W faster than x @ W^T does.
With few output rows for many inputs (down_proj: N 4096, K 14336) K is split over `split_k`
programs per n block; they write float32 partial sums [split_k, M, N] and a second kernel adds
them up in x's dtype. Every size follows from the shapes alone (no host sync, no allocation
that depends on values), so a step that calls this can be captured in a CUDA graph.

An fp8 (e4m3) weight with one scale per output channel is read at half the bytes: its tile is
widened in registers (exactly: to float32 for the multiply-adds, to x's dtype on the tensor
cores), and each output is multiplied by its channel's scale at the end (weight-only: x is not
rounded to fp8, so this is the CPU path's exact twin). For one row, its products are summed in
a [BLOCK_N, BLOCK_K] accumulator, the layout the tile is loaded in: the general
[BLOCK_M, BLOCK_N, BLOCK_K] one read the fp8 tile back from shared memory a byte at a time.
On an H100 this made one-sequence fp8 decode faster; bf16 weights keep the general
accumulator, which was faster for them (docs/kernels.md has the figures).

A gated input (the MLP's down_proj) is read as x [M, 2K] = [gate | up] and multiplied as
silu(gate) * up, made tile by tile and rounded as server/kernels/activation.py rounds it: one
launch and one write of the activations fewer per layer.

A mixture-of-experts layer's decode rows (`experts`) each read their own expert's weight from
a stack [E, N, K]: one row per program, along a third grid axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.kernels.launch import LAUNCH, PDL, wait_for_inputs
from server.kernels.lora import LoRAUpdate, block_r, epilogue_chunk, lora_epilogue
from server.kernels.precision import dot_precision

MAX_ROWS = 16  # the largest batch the kernel is for (decode graphs); the dot pads rows to it
SHARED_MEMORY = 227 * 1024  # an H100's per-block limit: the pipeline's tiles in flight must fit


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, experts_ptr, M, N, K, stride_xm, stride_wn, stride_we, x_repeat,
                 k_per_split, t_ptr, lora_b_ptr, slots_ptr, rank, t_splits, stride_t_split, stride_t, stride_b_slot,
                 stride_b_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                 SCALED: tl.constexpr, GATED: tl.constexpr, EXPERTS: tl.constexpr, LORA: tl.constexpr,
                 BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, T_SPLITS: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    split = tl.program_id(1)
    if EXPERTS:  # program (n block, k split, row): output row `row` from its own expert's weight
        row = tl.program_id(2)
        expert = tl.load(experts_ptr + row).to(tl.int64)
        w_ptr += expert * stride_we
        scale_ptr += expert * N
        x_ptr += (row // x_repeat) * stride_xm
        out_ptr += row * N
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # outputs: rows of W
    cmask = cols < N
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (lo + offs_k)[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + (lo + offs_k)[None, :]
    ONE_ROW: tl.constexpr = BLOCK_M == 1 and SCALED and not DOT  # (bf16 is faster the general way)
    if DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    elif ONE_ROW:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(lo, hi, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            xmask = rmask[:, None]
            w = tl.load(w_ptrs, mask=cmask[:, None], other=0.0)
        else:
            kmask = (k0 + offs_k) < K
            xmask = rmask[:, None] & kmask[None, :]
            w = tl.load(w_ptrs, mask=cmask[:, None] & kmask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=xmask, other=0.0)
        if GATED:  # x is the gate; silu(gate) * up, each product rounded to x's dtype
            up = tl.load(x_ptrs + K, mask=xmask, other=0.0).to(tl.float32)
            g = x.to(tl.float32)
            x = ((g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32) * up).to(x.dtype)
        if SCALED:  # fp8: widened here (exactly), scaled at the end
            w = w.to(x.dtype if DOT else tl.float32)
        if DOT:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        elif ONE_ROW:
            acc += x.to(tl.float32) * w
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if DOT:
        acc = tl.trans(acc)
    elif ONE_ROW:
        acc = tl.sum(acc, axis=1)[None, :]
    else:
        acc = tl.sum(acc, axis=2)
    if SCALED:
        acc *= tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    if LORA:  # the rows' adapter updates, once (in the first split's partial sums)
        if split == 0:
            acc += lora_epilogue(rows, rmask, cols, cmask, t_ptr, lora_b_ptr, slots_ptr, rank, t_splits, stride_t_split,
                                 stride_t, stride_b_slot, stride_b_out, BLOCK_M, BLOCK_N, BLOCK_R, R_CHUNK, T_SPLITS)
    out = out_ptr + split * M * N + rows[:, None] * N + cols[None, :]  # (EXPERTS: out_ptr is at its row)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, size, split_k, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[i] = sum over s of partial[s, i] (float32), rounded to out's dtype."""
    wait_for_inputs(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(split_k):
        total += tl.load(partial_ptr + s * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvConfig:
    """Tiles and launch shape of one product (benchmarks/kernel_bench/gemv.py sweeps them)."""

    block_n: int = 16  # rows of W per program
    block_k: int = 512  # columns of W per tile
    num_warps: int = 4
    num_stages: int = 4  # tiles in flight per program
    split_k: int = 1  # programs sharing one block of rows, each over its own run of K
    dot: bool = False  # tensor cores (x's rows padded to 16) rather than float32 multiply-adds


def default_config(M: int, N: int, K: int, weight_bytes: int = 2, gated: bool = False) -> GemvConfig:
    """The tiles that read Mistral-7B's weights fastest on an H100 in
    benchmarks/kernel_bench/gemv.py's sweep (down_proj timed gated, as the layers call it);
    docs/kernels.md has the table and the sweep's figures.
    One row: float32 multiply-adds. bf16 over 4 rows of W (8 for long rows: down_proj) with
    1024-wide tiles and no pipelining, four 16-byte loads per thread being enough in flight;
    fp8 over 1024-wide tiles, 4 rows of W five deep for the wide weights (qkv, gate_up), else 8
    rows three deep.
    2-16 rows (bf16: ahead of cuBLAS on a layer's four products): float32 multiply-adds over
    512-wide tiles while their accumulators stay in 64 registers a thread (2 rows of
    down_proj, up to 4 of the wide gate_up and LM head); else the tensor cores, 64 rows of W
    256 wide three deep for qkv, 128 wide six deep for o_proj, and 128-square tiles over 8
    warps for the wide weights and (K split in four) the gated down_proj.
    fp8 at 2-16 rows: 512-wide multiply-adds for 2 rows, else tiles of 64 rows by 128 on the
    tensor cores with K split in four (six deep for the gated down_proj, which three deep
    read more slowly). The tensor-core pipeline is never deeper than shared memory holds (a
    gated input's stage holds two tiles of x)."""
    if M == 1:
        if weight_bytes == 1:
            wide = N > K  # qkv, gate_up
            return GemvConfig(block_n=4 if wide else 8, block_k=1024, num_warps=4, num_stages=5 if wide else 3)
        return GemvConfig(block_n=8 if K > 4096 else 4, block_k=1024, num_warps=4, num_stages=1)
    long, wide = gated or K > 4096, N >= 4 * K  # down_proj; gate_up and the LM head
    if M <= 2 and long:
        return GemvConfig(block_n=8, block_k=512, num_warps=4, num_stages=3)
    if (M <= 2 and weight_bytes == 1) or (M <= 4 and wide and weight_bytes == 2):
        return GemvConfig(block_n=4, block_k=512, num_warps=4, num_stages=5)
    warps, split_k = 4, 1
    if weight_bytes == 1:
        block_n, block_k, stages, split_k = 64, 128, 6 if gated else 3, 4
    elif gated or wide:
        block_n, block_k, stages, warps, split_k = 128, 128, 4, 8, 4 if gated else 1
    elif long:
        block_n, block_k, stages = 64, 256, 5
    else:  # qkv, o_proj
        block_n, block_k, stages = (64, 256, 3) if N > K else (64, 128, 6)
    stage_bytes = block_n * block_k * weight_bytes + MAX_ROWS * block_k * 2 * (2 if gated else 1)
    stages = min(stages, SHARED_MEMORY // stage_bytes)
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages, split_k=split_k, dot=True)


def suits(x: torch.Tensor) -> bool:
    """Whether gemv is the product for this input: a CUDA decode batch of 1 to MAX_ROWS rows
    in half precision, each row contiguous."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16))


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None,
         weight_scale: torch.Tensor | None = None, gated: bool = False,
         experts: torch.Tensor | None = None, lora: LoRAUpdate | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight [N, K]^T -> [M, N] in x's dtype; an e4m3 weight is
    multiplied as weight * weight_scale[N] (float32, one scale per output channel). gated: x
    is [M, 2K] = [gate | up] and the product's input silu(gate) * up.
    experts [P] (integers; P a multiple of M, at most MAX_ROWS): weight is a stack [E, N, K]
    (weight_scale [E, N]) and output row p is x[p // (P / M)] @ weight[experts[p]]^T -> [P, N],
    one row per program (a mixture-of-experts layer's few decode rows, each read from the
    expert it was routed to).
    lora: the rows' adapter updates (their shrink done), added to the products before they are
    rounded: no launch of their own (server/kernels/lora.py)."""
    M = x.shape[0]
    rows = M if experts is None else experts.numel()
    if experts is not None and (weight.dim() != 3 or rows % max(M, 1) or experts.dim() != 1):
        raise ValueError("experts [P] need a stacked weight [E, N, K] and P a multiple of x's rows")
    N, K = weight.shape[-2:]
    if x.shape[1] != (2 * K if gated else K):
        raise ValueError(f"x has {x.shape[1]} columns for a weight of {K}{' (gated: twice that)' if gated else ''}")
    scaled = weight.dtype == torch.float8_e4m3fn
    if scaled != (weight_scale is not None):
        raise ValueError("an e4m3 weight, and only one, comes with a weight_scale")
    if scaled and (weight_scale.dtype != torch.float32 or weight_scale.numel() != weight[..., 0].numel()):
        raise ValueError(f"weight_scale must be {N} float32 scales, one per output channel (of each expert)")
    if not scaled and x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the weight {weight.dtype}")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows of x, not {rows}")
    if x.stride(1) != 1 or weight.stride(-1) != 1:
        raise ValueError("gemv needs the rows of x and of the weight to be contiguous")
    c = config or default_config(1 if experts is not None else M, N, K, weight.element_size(), gated)
    if experts is not None and c.dot:
        raise ValueError("rows read from their own experts are multiplied one per program, without the tensor cores")
    if lora is not None and (experts is not None or lora.b.shape[1] != N or lora.t.shape[1] != M):
        raise ValueError("a LoRA update needs one row of t per row of x and a B of the product's outputs")
    per_split = triton.cdiv(triton.cdiv(K, c.block_k), c.split_k) * c.block_k
    split_k = triton.cdiv(K, per_split)  # no split left without columns
    out = torch.empty((rows, N), dtype=x.dtype, device=x.device)  # [rows, N]
    partial = out if split_k == 1 else torch.empty((split_k, rows, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, c.block_n), split_k) + ((rows,) if experts is not None else ())
    block_m = 1 if experts is not None else MAX_ROWS if c.dot else triton.next_power_of_2(M)
    if lora is None:
        lora_args, r_block, t_splits = (x, x, x, 0, 0, 0, 0, 0, 0), 1, 1
    else:
        t, b = lora.t, lora.b
        lora_args = (t, b, lora.row_slots, b.shape[2], t.shape[0], t.stride(0), t.stride(1), b.stride(0), b.stride(1))
        r_block, t_splits = block_r(b.shape[2]), triton.next_power_of_2(t.shape[0])
    _gemv_kernel[grid](
        x, weight, weight_scale if scaled else x, partial, x if experts is None else experts, rows, N, K,
        x.stride(0), weight.stride(-2), weight.stride(0) if experts is not None else 0, rows // M, per_split,
        *lora_args, BLOCK_M=block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, NUM_STAGES=c.num_stages, DOT=c.dot,
        EVEN_K=K % c.block_k == 0, PRECISION=dot_precision(x.dtype), SCALED=scaled, GATED=gated,
        EXPERTS=experts is not None, LORA=lora is not None, BLOCK_R=r_block,
        R_CHUNK=epilogue_chunk(block_m, c.block_n, r_block), T_SPLITS=t_splits, PDL=PDL, num_warps=c.num_warps,
        **LAUNCH)
    if split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(rows * N, block),)](partial, out, rows * N, split_k, BLOCK=block, PDL=PDL,
                                                             **LAUNCH)
    return out
