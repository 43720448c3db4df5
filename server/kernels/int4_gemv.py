"""Decode's 4-bit matrix products: y = x @ W^T for a few rows of x and a 4-bit weight.

The weight is in our layout (server/kernels/quant_reference.py): qweight [K/8, N] int32 (input 8r + i
in bits 4i..4i+3 of word r), zeros [G, N] uint8, scales [G, N]; input k is in group
k // group_size. x [M, K] (M at most MAX_ROWS, each row contiguous), y [M, N] in x's dtype:
    y[m, n] = sum_k x[m, k] * (q[k, n] - z[g(k), n]) * s[g(k), n]      (float32 sums)
A decode step reads every packed word once for a handful of rows, so its time is the time to
read them, half a byte a weight; at an H100's 3 TB/s that is 6e12 weights a second, and a
handful of instructions per weight is already all the SMs can issue. So:

Program (n block, k split) owns BLOCK_N columns and walks its share of K in tiles of BLOCK_K
inputs, [BLOCK_K/8, BLOCK_N] words, each row of the tile one contiguous run. A tile lies inside
one group, so its scale and zero point leave the sum over the tile:
    sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)
and nibbles enter the products bare. A nibble becomes a float without a conversion: moved to
the top of a mantissa and or-ed with the bits of 1.0 it reads as 1 + q/16, so that
    sum_k x_k q_k = 16 * (sum_k x_k (1 + q_k/16) - sum_k x_k).
The and-or is one LOP3 instruction only if one of its two constants sits in a register, so the
bits of 1.0 come in as kernel arguments. The unpacked tile is never reshaped to [BLOCK_K,
BLOCK_N] (a trip through shared memory): nibble i of every word meets x's inputs 8r + i, read
strided from x (which the L1 cache holds). A tile is multiplied either
  - in float32 multiply-adds, for one row (a few at most). One shift of a word brings nibbles
    2j and 2j + 1 to mantissa bits 15..18 and 19..22, where under the exponents of 16 and of 1
    they read as 16 + q/16 and 1 + q/16: a shift per two weights, an and-or and a multiply-add
    per weight. A thread owns four columns and all rows of the tile, so the sum over the tile's
    rows needs no shuffles. bf16 x comes four inputs to an 8-byte load (8r + 4h .. 8r + 4h + 3),
    each input widened with one shift or and, which on an H100 was faster than one 2-byte load
    and conversion per input (benchmarks/kernel_bench/int4_gemv.py; docs/kernels.md); or
  - on the tensor cores, rows padded to 16. One shift and and-or put nibbles i and i + 4 of a
    word into the two 16-bit halves of a register as 1 + q/16 (exact in bf16 and fp16), and the
    halves are consecutive inputs of the dot: [BLOCK_N, 16] += [BLOCK_N, BLOCK_K/4] @ x's inputs
    (8r + i, 8r + i + 4) transposed, the weight the dot's left operand, in registers.
On CUDA, up to 8 rows take neither: `_int4_mma_kernel` (below) issues mma.sync itself, the
weight going from its registers straight into the tensor cores' operands, at fewer
instructions a weight than the multiply-adds take (docs/kernels.md has the counts and what 8
rows cost against one; the layers send it 1 to GEMV_MAX_ROWS rows; Triton's interpreter runs
it with the mma emulated).
With few columns for many inputs, K is split over `split_k` programs per n block. Each writes
its float32 sums, and the last to finish adds them up (counted at `split_counters`, which it
sets back to zero): no second kernel. Every size follows from the shapes alone, so a step that
calls this can be captured in a CUDA graph.

That last split costs a product a round trip to the counter and the partial sums' reload
(docs/kernels.md has what that cost at one row). Given `sums` (int64 zeros), the mma path
defers the adding up instead: each split adds its sums to them atomically as integer counts
of SUM_UNIT (2^-32; server/kernels/quant_reference.py) and is done, and the kernel that reads
the product (the norm, silu_and_mul, the rotary embedding) turns them into the activations'
dtype and sets them back to zero, which made a layer's products and one-sequence decode
faster on an H100 (docs/kernels.md has the figures). Integer sums are the same in any order, so
the output does not depend on which split finished first (as float32 atomics would); they are
exact below 2^31 in magnitude, where activations are.

The mma path is launched with programmatic dependent launch (server/kernels/launch.py): its
programs wait for the kernel ahead before reading x, and the kernel after it launches early.
The weight is never written, so a program reads its first group (words, zero points and
scales; `early`: one or two groups) before that wait, while the kernel ahead (a norm, the
attention's merge, silu_and_mul: a few microseconds of latency with the memory idle) runs.
That, and the splits retuned for it (mma_config), made 4-bit one-sequence decode of a
Mistral-7B-shaped model faster on one H100 (engines in one process, runs alternated;
docs/kernels.md has the figures).

Under act-order with groups that are not runs of inputs (g_idx given: a row-parallel rank's
slice), int4_matmul does the product; that case is rare enough not to need its own tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from server.kernels.deferred import PER_UNIT
from server.kernels.gemv import MAX_ROWS
from server.kernels.int4_matmul import int4_matmul
from server.kernels.launch import LAUNCH, PDL, wait_for_inputs

ONE = 0x3F800000  # the bits of 1.0 in float32
SIXTEEN = 0x41800000  # and of 16.0
HALVES = {torch.bfloat16: 0x3F803F80, torch.float16: 0x3C003C00}  # of 1.0 twice, in x's dtype
UPPER = tl.constexpr(0x780000)  # mantissa bits 19..22: under 1.0's exponent a nibble reads as 1 + q/16
LOWER = tl.constexpr(0x78000)  # mantissa bits 15..18: under 16.0's, as 16 + q/16


@triton.jit
def _x_sum(x_rows, start, BLOCK_K: tl.constexpr, STEP: tl.constexpr):
    """sum over k = start, start + STEP, ... (BLOCK_K / STEP inputs) of x[m, k], float32 [BLOCK_M]."""
    at = x_rows[:, None] + start + STEP * tl.arange(0, BLOCK_K // STEP)[None, :]
    return tl.sum(tl.load(at).to(tl.float32), axis=1)


@triton.jit
def _nibble_pair(words, j: tl.constexpr, one, sixteen):
    """Nibbles 2j and 2j + 1 of each word as float32 16 + q/16 and 1 + q/16: one shift brings
    them to mantissa bits 15..18 and 19..22."""
    if j < 2:
        pair = words << (15 - 8 * j)
    else:
        pair = words >> (8 * j - 15)  # arithmetic, but the sign's copies stay above bit 22
    lower = ((pair & LOWER) | sixteen).to(tl.float32, bitcast=True)
    upper = ((pair & UPPER) | one).to(tl.float32, bitcast=True)
    return lower, upper


@triton.jit
def _fma_tile(words, x_rows, k0, one, sixteen, BLOCK_K: tl.constexpr, X_WORDS: tl.constexpr):
    """words [1, BLOCK_K/8, BLOCK_N] -> (sum_k x[m, k] q[k, n] [BLOCK_M, BLOCK_N], sum_k x[m, k]
    [BLOCK_M]) over the tile's inputs k0 .., in float32 multiply-adds. X_WORDS: x (bf16) is
    read four inputs to a load, else one."""
    BLOCK_W: tl.constexpr = words.shape[1]
    x_at = x_rows[:, None] + k0 + 8 * tl.arange(0, BLOCK_W)[None, :]  # [BLOCK_M, BLOCK_K/8]: inputs 8r
    part = tl.zeros([x_rows.shape[0], BLOCK_W, words.shape[2]], tl.float32)  # [BLOCK_M, BLOCK_K/8, BLOCK_N]
    for h in tl.static_range(2):  # inputs 8r + 4h .. 8r + 4h + 3: nibbles 4h .. 4h + 3
        if X_WORDS:
            four = tl.load(x_at.to(tl.pointer_type(tl.int64), bitcast=True) + h)
            pairs = (four.to(tl.int32), (four >> 32).to(tl.int32))  # two bf16 each, the lower input in the low half
        for i in tl.static_range(2):
            lower, upper = _nibble_pair(words, 2 * h + i, one, sixteen)
            if X_WORDS:
                xe, xo = _halves(pairs[i], True)
            else:
                xe = tl.load(x_at + 4 * h + 2 * i).to(tl.float32)
                xo = tl.load(x_at + 4 * h + 2 * i + 1).to(tl.float32)
            part = tl.fma(xe[:, :, None], lower, part)
            part = tl.fma(xo[:, :, None], upper, part)
    # part sums x_k (16 + q_k/16) over even k and x_k (1 + q_k/16) over odd k
    x_even = _x_sum(x_rows, k0, BLOCK_K, 2)
    x_odd = _x_sum(x_rows, k0 + 1, BLOCK_K, 2)
    return 16.0 * (tl.sum(part, axis=1) - (16.0 * x_even + x_odd)[:, None]), x_even + x_odd


@triton.jit
def _dot_tile(words, x_rows, k0, halves, BLOCK_K: tl.constexpr):
    """words [BLOCK_K/8, BLOCK_N] -> (sum_k x[m, k] q[k, n] transposed [BLOCK_N, BLOCK_M], sum_k x[m, k]
    [BLOCK_M]) over the tile's inputs k0 .., on the tensor cores."""
    BF16: tl.constexpr = x_rows.dtype.element_ty == tl.bfloat16
    AT: tl.constexpr = 3 if BF16 else 6  # the bit at which 1 + q/16 has q: 7 mantissa bits, or 10
    MASK: tl.constexpr = 0xF << AT | 0xF << (AT + 16)
    part = tl.zeros([words.shape[1], x_rows.shape[0]], tl.float32)
    pair_k = tl.arange(0, 2 * words.shape[0])  # the dot's inputs, 2r + h: nibble i + 4h of word row r
    for i in tl.static_range(4):  # nibbles i and i + 4 to bits AT.. and AT + 16..: two halves at once
        if 4 * i <= AT:
            bits = words << (AT - 4 * i)
        else:
            bits = words >> (4 * i - AT)
        bits = (bits & MASK) | halves
        low = tl.trans(bits.to(tl.int16))  # [BLOCK_N, BLOCK_K/8]: nibble i
        high = tl.trans((bits >> 16).to(tl.int16))  # nibble i + 4
        ones_q = tl.reshape(tl.join(low, high), (words.shape[1], 2 * words.shape[0]))  # [BLOCK_N, BLOCK_K/4]
        x = tl.load(x_rows[:, None] + k0 + 8 * (pair_k // 2)[None, :] + 4 * (pair_k % 2)[None, :] + i)
        part = tl.dot(ones_q.to(x.dtype, bitcast=True), tl.trans(x), part)
    x_sum = _x_sum(x_rows, k0, BLOCK_K, 1)
    return 16.0 * (part - x_sum[None, :]), x_sum


@triton.jit
def _sum_splits(partial_ptr, out_ptr, counters_ptr, block, num_splits, M, N, rows, cols):
    """After a split has written its float32 sums of rows x cols to partial[split]: the last of
    a column block's splits to finish adds them all up, in split order (the same sums whichever
    finishes last), writes the output and sets the block's counter back to zero."""
    tl.debug_barrier()  # every thread's sums written before the count says so
    if tl.atomic_add(counters_ptr + block, 1, sem="acq_rel") == num_splits - 1:
        at = rows[:, None] * N + cols[None, :]
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        total = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
        for other in range(num_splits):
            total += tl.load(partial_ptr + other * M * N + at, mask=inside, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=inside)
        tl.atomic_xchg(counters_ptr + block, 0)


@triton.jit
def _int4_gemv_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, out_ptr, partial_ptr, counters_ptr, M, N,
                      stride_xm, words_per_split, num_splits, K_WORDS, one, sixteen, halves,
                      GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr,
                      X_WORDS: tl.constexpr):
    BLOCK_W: tl.constexpr = BLOCK_K // 8  # rows of words per tile
    block = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    x_rows = x_ptr + tl.minimum(rows, M - 1) * stride_xm  # rows past M read row M - 1, and are not stored
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    lo = split * words_per_split
    hi = tl.minimum(lo + words_per_split, K_WORDS)
    offs_w = tl.arange(0, BLOCK_W)
    w_ptrs = qweight_ptr + (lo + offs_w)[:, None].to(tl.int64) * N + cols[None, :]  # [BLOCK_W, BLOCK_N]
    if DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # y transposed: the weight is the dot's left operand
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for w0 in tl.range(lo, hi, BLOCK_W, num_stages=NUM_STAGES):
        k0 = w0 * 8
        group = (k0 // GROUP_SIZE) * N + cols
        z = tl.load(zeros_ptr + group, mask=cmask, other=0).to(tl.float32)  # [BLOCK_N]
        s = tl.load(scales_ptr + group, mask=cmask, other=0.0).to(tl.float32)
        if DOT:
            words = tl.load(w_ptrs, mask=cmask[None, :], other=0)
            q_sum, x_sum = _dot_tile(words, x_rows, k0, halves, BLOCK_K)
            acc += s[:, None] * (q_sum - z[:, None] * x_sum[None, :])
        else:
            # loaded as a 3-d tile, which gives the product's layout: each thread a 16-byte run of
            # columns in every row of the tile, so that the sum over rows needs no shuffles
            words = tl.load(w_ptrs[None, :, :], mask=cmask[None, None, :], other=0)
            q_sum, x_sum = _fma_tile(words, x_rows, k0, one, sixteen, BLOCK_K, X_WORDS)
            acc += s[None, :] * (q_sum - z[None, :] * x_sum[:, None])
        w_ptrs += BLOCK_W * N
    if DOT:
        acc = tl.trans(acc)
    at = rows[:, None] * N + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if SPLIT:
        tl.store(partial_ptr + split * M * N + at, acc, mask=mask)
        _sum_splits(partial_ptr, out_ptr, counters_ptr, block, num_splits, M, N, rows, cols)
    else:
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=mask)


# -- up to 8 rows on the tensor cores, the weight never leaving registers ---------------------
#
# mma.sync m16n8k16 multiplies A [16, 16] by B [16, 8] with each operand spread over the warp's
# registers in a fixed pattern. Lane 4g + c holds, in one register each, the A pairs
# (row g, k 2c..2c+1), (row g + 8, k 2c..2c+1), (row g, k 2c+8..2c+9), (row g + 8, k 2c+8..2c+9),
# the B pairs (k 2c..2c+1, col g), (k 2c+8..2c+9, col g), and gets D (row g, col 2c), (row g,
# col 2c+1), (row g + 8, col 2c), (row g + 8, col 2c+1). Here A's rows are 16 output columns of
# the weight and B's columns the rows of x, so a lane needs, for two output columns, 4 inputs
# each: which inputs a k-slot stands for is ours to choose, as long as A and B agree. Lane 4g + c
# takes word row 4t + c of each 4-row step t (8 inputs), one word for output column g and one
# for g + 8. A word's nibbles p and p + 4 become one register with one shift (none for p = 0)
# and one and-or: at the bottom of two 16-bit mantissas under the exponent of 1.0 they read as
# 1 + q/E in each half (E = 128 for bf16, 1024 for fp16); B holds x's inputs (8r + p, 8r + p + 4)
# to match. Two mma cover a step: nibble pairs 0 and 1, then 2 and 3. Over a group the products
# (exact) sum in float32 to D = X + sum_k x_k q_k / E, X = sum_k x_k, and one more mma with A all
# ones gives X in the same places, so that the group adds s (E D - (E + z) X) to the output.
# A program is one warp over J blocks of 16 columns; a lane's J columns of each word row are
# consecutive, one load. Every tensor the mma reads is [32], element i on lane i: the one layout
# Triton gives a [32] tensor in one warp whatever it can prove of the addresses (a [32, J]
# tensor's lanes would follow the alignment Triton can prove, and the mma would then pair the
# wrong registers).

@triton.jit
def _halves(v, BF16: tl.constexpr):
    """int32 holding two 16-bit floats -> them in float32 (low half, high half)."""
    if BF16:
        return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)
    low = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = ((v >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _nibbles(words, p: tl.constexpr, ones):
    """Nibbles p and p + 4 of each word at the bottom of the two halves of an int32, or-ed with
    the bits of 1.0 in both (`ones`, in a register, so that the and-or is one instruction)."""
    return ((words >> (4 * p)) & 0x000F000F) | ones


@triton.jit
def _fragment(first, second, BF16: tl.constexpr):
    """Emulation: the [32] registers of a fragment's two k-halves -> [8 (g), 16 (k-slot)]."""
    lo, hi = _halves(first, BF16)
    a = tl.reshape(tl.join(tl.reshape(lo, (8, 4)), tl.reshape(hi, (8, 4))), (8, 8))
    lo, hi = _halves(second, BF16)
    b = tl.reshape(tl.join(tl.reshape(lo, (8, 4)), tl.reshape(hi, (8, 4))), (8, 8))
    return tl.reshape(tl.join(a, b), (8, 16))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, d, BF16: tl.constexpr, EMULATE: tl.constexpr):
    """D += A B on the warp's fragments: [32] tensors (element i on lane i), d a tuple of 4."""
    if EMULATE:  # Triton's interpreter: the same sums from whole tensors
        bt = _fragment(b0, b1, BF16)  # [8 (col), 16]
        top = tl.sum(_fragment(a0, a2, BF16)[:, None, :] * bt[None, :, :], axis=2)  # [8 (row g), 8 (col)]
        bottom = tl.sum(_fragment(a1, a3, BF16)[:, None, :] * bt[None, :, :], axis=2)
        t0, t1 = tl.split(tl.reshape(top, (8, 4, 2)))  # col 2c, col 2c + 1
        u0, u1 = tl.split(tl.reshape(bottom, (8, 4, 2)))
        return (d[0] + tl.reshape(t0, (32,)), d[1] + tl.reshape(t1, (32,)), d[2] + tl.reshape(u0, (32,)),
                d[3] + tl.reshape(u1, (32,)))
    op: tl.constexpr = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" if BF16 else
                        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") + \
        " {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
    return tl.inline_asm_elementwise(op, "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",  # D in C's registers
                                     [a0, a1, a2, a3, b0, b1, d[0], d[1], d[2], d[3]],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _load_words(at, keep, J: tl.constexpr):
    """The J consecutive values at `at` ([32] pointers) as J [32] tensors, zeros where `keep` is
    false: one [32, J] load (a vector a lane where Triton can prove the alignment), split."""
    words = tl.load(at[:, None] + tl.arange(0, J)[None, :], mask=keep[:, None], other=0)
    if J == 1:
        return (tl.reshape(words, (32,)),)
    elif J == 2:
        return tl.split(words)
    else:
        low, high = tl.split(tl.reshape(words, (32, 2, 2)))  # words (0, 2) and (1, 3)
        w0, w2 = tl.split(low)
        w1, w3 = tl.split(high)
        return w0, w1, w2, w3


@triton.jit
def _x_pairs(x_words, row, s: tl.constexpr):
    """B's two registers for nibble pairs 2*s and 2*s + 1 of word row `row`: x's inputs
    (8r + 2*s, 8r + 2*s + 4) and (8r + 2*s + 1, 8r + 2*s + 5)."""
    at = x_words + 4 * row + s  # inputs 8r + 2*s, 8r + 2*s + 1 (their word), and 4 further
    lo = tl.load(at)
    hi = tl.load(at + 2)
    return (lo & 0xFFFF) | (hi << 16), ((lo >> 16) & 0xFFFF) | (hi & -65536)


@triton.jit
def _group_words(qweight_ptr, zeros_ptr, scales_ptr, group, col, c, N, GROUP_SIZE: tl.constexpr, J: tl.constexpr):
    """A lane's words of one group, step by step (w0 then w1, J each), then its zero points and
    scales (z0, z1, s0, s1, J each): one flat tuple."""
    words = ()
    for t in tl.static_range(GROUP_SIZE // 32):
        row = group * (GROUP_SIZE // 8) + 4 * t + c  # this lane's word row
        words += _load_words(qweight_ptr + row.to(tl.int64) * N + col, col < N, J)  # A row g
        words += _load_words(qweight_ptr + row.to(tl.int64) * N + col + 8 * J, col + 8 * J < N, J)  # g + 8
    words += _load_words(zeros_ptr + group * N + col, col < N, J)  # the zero points and scales of A rows g
    words += _load_words(zeros_ptr + group * N + col + 8 * J, col + 8 * J < N, J)  # and g + 8
    words += _load_words(scales_ptr + group * N + col, col < N, J)
    words += _load_words(scales_ptr + group * N + col + 8 * J, col + 8 * J < N, J)
    return words


@triton.jit
def _group_product(acc, words, x_words, group, c, ones, all_ones, zero, GROUP_SIZE: tl.constexpr, J: tl.constexpr,
                   BF16: tl.constexpr, EMULATE: tl.constexpr):
    """acc (the tuple below) plus one group's products, from its words (_group_words)."""
    E: tl.constexpr = 128.0 if BF16 else 1024.0  # 1 + q/E: q in the lowest bits of 7 mantissa bits, or 10
    STEPS: tl.constexpr = GROUP_SIZE // 32  # 4 word rows (32 inputs) a step
    e = (zero, zero, zero, zero)  # X of x row 2c, of 2c + 1, and both again
    d = (zero,) * (4 * J)
    for t in tl.static_range(STEPS):
        row = group * (GROUP_SIZE // 8) + 4 * t + c
        for s in tl.static_range(2):  # nibble pairs (2*s, 2*s + 4) and (2*s + 1, 2*s + 5)
            xa, xb = _x_pairs(x_words, row, s)
            e = _mma(all_ones, all_ones, all_ones, all_ones, xa, xb, e, BF16, EMULATE)
            summed = ()
            for j in tl.static_range(J):
                w0, w1 = words[2 * J * t + j], words[2 * J * t + J + j]
                summed += _mma(_nibbles(w0, 2 * s, ones), _nibbles(w1, 2 * s, ones),
                               _nibbles(w0, 2 * s + 1, ones), _nibbles(w1, 2 * s + 1, ones), xa, xb,
                               (d[4 * j], d[4 * j + 1], d[4 * j + 2], d[4 * j + 3]), BF16, EMULATE)
            d = summed
    at: tl.constexpr = 2 * J * STEPS  # the zero points and scales
    scaled = ()
    for j in tl.static_range(J):
        za, zb = E + words[at + j].to(tl.float32), E + words[at + J + j].to(tl.float32)
        sa, sb = words[at + 2 * J + j].to(tl.float32), words[at + 3 * J + j].to(tl.float32)
        scaled += (acc[4 * j] + sa * (E * d[4 * j] - za * e[0]),
                   acc[4 * j + 1] + sa * (E * d[4 * j + 1] - za * e[1]),
                   acc[4 * j + 2] + sb * (E * d[4 * j + 2] - zb * e[0]),
                   acc[4 * j + 3] + sb * (E * d[4 * j + 3] - zb * e[1]))
    return scaled


@triton.jit
def _int4_mma_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, out_ptr, partial_ptr, counters_ptr, M, N,
                     stride_xm, groups_per_split, num_splits, num_groups, ones, experts_ptr, x_repeat, split_stride,
                     GROUP_SIZE: tl.constexpr, J: tl.constexpr, BLOCK_M: tl.constexpr, BF16: tl.constexpr,
                     SPLIT: tl.constexpr, SUMS: tl.constexpr, EARLY: tl.constexpr, EMULATE: tl.constexpr,
                     EXPERTS: tl.constexpr, PDL: tl.constexpr):
    block = tl.program_id(0)
    split = tl.program_id(1)
    lane = tl.arange(0, 32)
    g, c = lane // 4, lane % 4
    # A rows g and g + 8 of block j: columns col + j and col + 8 J + j (a lane's J columns, one load)
    col = block * 16 * J + J * g
    first = split * groups_per_split
    end = tl.minimum(first + groups_per_split, num_groups)
    # The weight is never written: a program's first EARLY groups are read before the wait (a
    # second group past the program's last is its last again, read and not used).
    if EARLY >= 1:
        words = _group_words(qweight_ptr, zeros_ptr, scales_ptr, first, col, c, N, GROUP_SIZE, J)
    if EARLY >= 2:
        more = _group_words(qweight_ptr, zeros_ptr, scales_ptr, tl.minimum(first + 1, end - 1), col, c, N,
                            GROUP_SIZE, J)
    wait_for_inputs(PDL)
    if EXPERTS:  # program (block, split, row): output row `row` (M is 1) from its expert's stacked weight
        row = tl.program_id(2)
        expert = tl.load(experts_ptr + row).to(tl.int64)  # the router's pick: read after the wait, so EARLY is 0
        qweight_ptr += expert * (num_groups * (GROUP_SIZE // 8) * N)
        zeros_ptr += expert * (num_groups * N)
        scales_ptr += expert * (num_groups * N)
        x_ptr += (row // x_repeat) * stride_xm
        out_ptr += row * N
        partial_ptr += row * N
    x_words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.minimum(g, M - 1) * (stride_xm // 2)  # B col g
    all_ones = tl.zeros([32], tl.int32) + ones  # A of the mma that sums x
    zero = tl.zeros([32], tl.float32)
    acc = (zero,) * (4 * J)  # per block j: (row g, x row 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1)
    if EARLY >= 1:
        acc = _group_product(acc, words, x_words, first, c, ones, all_ones, zero, GROUP_SIZE, J, BF16, EMULATE)
    if EARLY >= 2:
        if first + 1 < end:
            acc = _group_product(acc, more, x_words, first + 1, c, ones, all_ones, zero, GROUP_SIZE, J, BF16,
                                 EMULATE)
    for group in range(first + EARLY, end):
        words = _group_words(qweight_ptr, zeros_ptr, scales_ptr, group, col, c, N, GROUP_SIZE, J)
        acc = _group_product(acc, words, x_words, group, c, ones, all_ones, zero, GROUP_SIZE, J, BF16, EMULATE)
    rows = 2 * c  # x rows of acc[4j] and acc[4j + 2]; acc[4j + 1] and acc[4j + 3] have the next
    if SPLIT and not SUMS:
        at = partial_ptr + split * split_stride
    else:
        at = out_ptr
    for j in tl.static_range(J):
        for k in tl.static_range(4):  # (column col + j, row 2c), (that column, 2c + 1), 8 J columns on, ...
            place = (rows + k % 2) * N + col + j + 8 * J * (k // 2)
            keep = (rows + k % 2 < M) & (col + j + 8 * J * (k // 2) < N)
            if SUMS:  # deferred: added to the int64 counts of SUM_UNIT (no value read back: a reduction)
                tl.atomic_add(at + place, (acc[4 * j + k] * PER_UNIT).to(tl.int64), mask=keep, sem="relaxed")
            else:
                tl.store(at + place, acc[4 * j + k].to(at.dtype.element_ty), mask=keep)
    if SPLIT and not SUMS and not EXPERTS:  # experts' splits are added up by the caller
        _sum_splits(partial_ptr, out_ptr, counters_ptr, block, num_splits, M, N, tl.arange(0, BLOCK_M),
                    block * 16 * J + tl.arange(0, 16 * J))


@dataclass(frozen=True)
class Int4GemvConfig:
    """Tiles and launch shape of one product (benchmarks/kernel_bench/int4_gemv.py sweeps them)."""

    block_n: int = 128  # columns per program (words per row of a tile)
    block_k: int = 128  # inputs per tile: block_k / 8 rows of words; divides the group size, 64+ on tensor cores
    num_warps: int = 4
    num_stages: int = 3  # tiles in flight per program
    split_k: int = 1  # programs sharing one block of columns, each over its own run of K
    dot: bool = False  # the tensor cores (x's rows padded to 16) rather than float32 multiply-adds
    mma: bool = False  # up to MMA_MAX_ROWS rows through mma.sync, one warp and a group of inputs a step
    early: int = 1  # mma: the groups (0-2) a program reads before it waits for the kernel ahead


PROGRAMS_IN_FLIGHT = 264  # two programs on each of an H100's 132 SMs
MMA_MAX_ROWS = 8  # the columns of mma.sync's B
GEMV_MAX_ROWS = MMA_MAX_ROWS  # the most rows the layers send here (int4_matmul takes more)


def split_k_for(N: int, K: int, block_n: int, block_k: int, num_warps: int, warps: int = 1024) -> int:
    """The splits of K that bring a launch to about `warps` warps in PROGRAMS_IN_FLIGHT programs
    or more (a product reads few bytes per column, so it needs many programs to keep enough
    reads in flight), leaving each split two tiles or more."""
    blocks = triton.cdiv(N, block_n)
    wanted = max(triton.cdiv(warps, blocks * num_warps), triton.cdiv(PROGRAMS_IN_FLIGHT, blocks))
    return max(1, min(wanted, K // (2 * block_k)))


def mma_config(M: int, N: int, K: int, group_size: int) -> Int4GemvConfig:
    """The mma path's tiles: 32 columns a program; K split for one row into programs of 2
    groups where K and N are at most 4,096 and 8,192 (qkv_proj and o_proj of Mistral-7B), else
    4 (gate_up_proj, down_proj); for more rows until about 4,096 warps, 2,048 for o_proj and
    for 8 rows of the others whose K is 4,096. A program reads its first group before it waits
    for the kernel ahead, and its second too where the launch has at most 2,048 programs (each
    then needs 76 registers a lane, 25 programs an SM: one wave on an H100).

    Chosen in the engine (4-bit one-sequence decode of a Mistral-7B-shaped model at 128-385
    tokens of context; engines made under each setting in one process, runs alternated, one
    H100), with the products alone timed in benchmarks/kernel_bench/int4_gemv.py's sweep, where the
    mma path was ahead of the multiply-adds at 1 and 8 rows and of int4_matmul at 8.
    docs/kernels.md has the sweep."""
    blocks, groups = triton.cdiv(N, 32), K // group_size
    if M == 1:
        split = triton.cdiv(groups, 2 if K <= 4096 and N <= 8192 else 4)
    else:
        warps = 2048 if K <= 4096 and (N <= 4096 or M > 4) else 4096
        split = min(groups, triton.cdiv(warps, blocks))
    split = triton.cdiv(groups, triton.cdiv(groups, split))  # the splits that have groups
    return Int4GemvConfig(block_n=32, num_warps=1, num_stages=1, split_k=split, mma=True,
                          early=2 if blocks * split <= 2048 else 1)


def config_for(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> Int4GemvConfig:
    """The tiles int4_gemv uses for this product when given none."""
    (M, K), N = x.shape, qweight.shape[1]
    if x.is_cuda and mma_suits(x, qweight, group_size):
        return mma_config(M, N, K, group_size)
    return default_config(M, N, K, group_size)


def default_config(M: int, N: int, K: int, group_size: int) -> Int4GemvConfig:
    """Where the mma path does not take the product (mma_suits; the CPU): one row,
    multiply-adds, one warp a program, the tiles that benchmarks/kernel_bench/int4_gemv.py found
    fastest on an H100 for each Mistral-7B weight: 128 columns and 64-input tiles a program;
    one tile in flight where K is 4,096, two for the wide gate_up and three for the long
    down_proj; K split until about 2,048 warps (512 for down_proj) are in flight, each split
    keeping two tiles or more. Two to four rows: multiply-adds still, on tiles small enough
    that a thread's float32 sums ([rows, block_k/8, 4]) fit in 64 registers; the sweep's
    fastest: for two rows 64-input tiles (256 columns over two warps where K is 4,096,
    32-input tiles for down_proj), for three or four 32-input tiles, ahead of int4_matmul
    and of bf16's gemv. More rows: the tensor cores (eight warps, a warp group for each 64
    columns) where a group holds a tile of 64 inputs or more, else multiply-adds over tiles
    whose sums fit. (On the H100 the tensor-core tiles were slower than int4_matmul at 8 and 16
    rows.) docs/kernels.md has the sweep's figures."""
    fits = min(128, group_size & -group_size, K & -K)  # the largest tile of K inside one group
    long, wide = K > 4096, N >= 16384
    if M == 1:
        tile = {"block_n": 128, "block_k": min(fits, 64), "num_warps": 1, "num_stages": 3 if long else 2 if wide else 1}
        warps = 512 if long else 2048
    elif M <= 4:
        if M == 2 and not long:
            tile = {"block_n": 128, "block_k": min(fits, 64), "num_warps": 1, "num_stages": 3} if wide else \
                {"block_n": 256, "block_k": min(fits, 64), "num_warps": 2, "num_stages": 2}
        else:
            tile = {"block_n": 128, "block_k": min(fits, 32), "num_warps": 1, "num_stages": 3 if wide or M == 2 else 2}
        warps = 2048 if wide else 1024
    elif fits >= 64:
        tile = {"block_n": 128, "block_k": fits, "num_warps": 8, "num_stages": 3, "dot": True}
        warps = 1024
    else:
        tile = {"block_n": 128, "block_k": min(fits, 128 // triton.next_power_of_2(M)), "num_warps": 1, "num_stages": 1}
        warps = 1024
    return Int4GemvConfig(**tile, split_k=split_k_for(N, K, tile["block_n"], tile["block_k"], tile["num_warps"], warps))


def split_counters(N: int, device) -> torch.Tensor:
    """Where int4_gemv's splits of K meet: a counter per block of columns (16 or more), zero
    between calls. A layer keeps its own, made before any CUDA graph is captured."""
    return torch.zeros(triton.cdiv(N, 16), dtype=torch.int32, device=device)


def _split_sums(out: torch.Tensor, split_k: int, counters: torch.Tensor | None):
    """Where the splits of K write their float32 sums, and their counters (made for this call
    if none are given); `out` twice where K is whole (neither is read then)."""
    if split_k == 1:
        return out, out
    M, N = out.shape
    counters = split_counters(N, out.device) if counters is None else counters
    if counters.numel() * 16 < N:
        raise ValueError(f"{counters.numel()} split counters are too few for {N} columns")
    return torch.empty((split_k, M, N), dtype=torch.float32, device=out.device), counters


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None, group_size: int, config: Int4GemvConfig | None = None,
              counters: torch.Tensor | None = None, sums: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (1 <= M <= MAX_ROWS, bf16 or fp16, contiguous rows) -> [M, N] in x's dtype.
    g_idx None: input k is in group k // group_size. `counters`: split_counters(N), or made
    for this call when K is split. `sums`: int64 zeros [M or more, N], where the mma path, when
    it takes the product, leaves it as deferred sums (the module's docstring) and returns
    sums[:M]; the other paths return the product as usual."""
    M, K = x.shape
    N = qweight.shape[1]
    if qweight.shape[0] * 8 != K:
        raise ValueError(f"x has {K} columns but the weight {qweight.shape[0] * 8} inputs")
    if not 1 <= M <= MAX_ROWS or x.stride(1) != 1 or x.dtype not in HALVES:
        raise ValueError(f"int4_gemv takes 1 to {MAX_ROWS} rows of bf16 or fp16 x, each contiguous, "
                         f"not {M} rows of {x.dtype}")
    if g_idx is not None:
        return int4_matmul(x, qweight, zeros, scales, g_idx, group_size)
    c = config or config_for(x, qweight, group_size)
    if c.mma:
        return _int4_mma(x, qweight, zeros, scales, group_size, c, counters, sums)
    if group_size % c.block_k or K % c.block_k or (c.dot and c.block_k < 64) or c.block_n < 16:
        raise ValueError(f"a tile of {c.block_k} inputs must divide K ({K}) and the group size ({group_size}) "
                         f"and be 64 or more on the tensor cores, and one of {c.block_n} columns 16 or more")
    words = K // 8
    per_split = triton.cdiv(triton.cdiv(words, c.block_k // 8), c.split_k) * (c.block_k // 8)
    split_k = triton.cdiv(words, per_split)  # no split left without words
    blocks = triton.cdiv(N, c.block_n)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    partial, counters = _split_sums(out, split_k, counters)
    # bf16 x read four inputs (8 bytes) to a load where its rows allow
    x_words = x.dtype == torch.bfloat16 and x.data_ptr() % 8 == 0 and x.stride(0) % 4 == 0
    _int4_gemv_kernel[(blocks, split_k)](
        x, qweight, zeros, scales, out, partial, counters, M, N, x.stride(0),
        per_split, split_k, words, ONE, SIXTEEN, HALVES[x.dtype], GROUP_SIZE=group_size,
        BLOCK_M=MAX_ROWS if c.dot else triton.next_power_of_2(M), BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        NUM_STAGES=c.num_stages, DOT=c.dot, SPLIT=split_k > 1, X_WORDS=x_words, num_warps=c.num_warps)
    return out


def mma_suits(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Whether _int4_mma takes this product: up to 8 rows of x read two inputs (4 bytes) to a
    load, words read four (16 bytes) to a load, groups of whole 32-input steps."""
    return x.shape[0] <= MMA_MAX_ROWS and group_size % 32 == 0 and x.stride(1) == 1 and x.stride(0) % 2 == 0 \
        and x.data_ptr() % 4 == 0 and qweight.shape[1] % 4 == 0 and qweight.data_ptr() % 16 == 0


def _int4_mma(x, qweight, zeros, scales, group_size: int, c: Int4GemvConfig, counters, sums) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[1]
    if not mma_suits(x, qweight, group_size) or c.block_n not in (16, 32, 64) or c.num_warps != 1 or K % group_size \
            or c.early not in (0, 1, 2):
        raise ValueError(f"the mma path takes up to {MMA_MAX_ROWS} rows, groups of a multiple of 32 inputs dividing "
                         f"K, outputs in fours, one warp, 16, 32 or 64 columns and 0-2 early groups; not {M} rows, "
                         f"{N} outputs, group size {group_size}, K {K}, {c}")
    groups = K // group_size
    per_split = triton.cdiv(groups, c.split_k)
    split_k = triton.cdiv(groups, per_split)
    blocks = triton.cdiv(N, c.block_n)
    if sums is not None:
        if sums.dtype != torch.int64 or sums.shape[0] < M or sums.shape[1] != N or not sums.is_contiguous():
            raise ValueError(f"deferred sums of {M} x {N} go to contiguous int64 [{M} or more, {N}], "
                             f"not {sums.dtype} {list(sums.shape)}")
        out = partial = sums[:M]
        counters = out  # neither partial sums nor counters are read
    else:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        partial, counters = _split_sums(out, split_k, counters)
    _int4_mma_kernel[(blocks, split_k)](
        x, qweight, zeros, scales, out, partial, counters, M, N, x.stride(0), per_split,
        split_k, groups, HALVES[x.dtype], x, 1, M * N, GROUP_SIZE=group_size, J=c.block_n // 16,
        BLOCK_M=triton.next_power_of_2(M), BF16=x.dtype == torch.bfloat16, SPLIT=split_k > 1,
        SUMS=sums is not None, EARLY=c.early, EMULATE=knobs.runtime.interpret, EXPERTS=False, PDL=PDL, num_warps=1,
        num_stages=c.num_stages, **LAUNCH)
    return out


def int4_gemv_experts(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                      group_size: int, experts: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts layer's few decode rows, each from the expert it was routed to:
    qweight [E, K/8, N], zeros and scales [E, G, N] (groups that are runs of inputs), experts [P]
    (P a multiple of x's M rows, at most MAX_ROWS): output row p is x[p // (P / M)] times
    expert experts[p]'s weight -> [P, N] in x's dtype. The mma path's programs, a third grid
    axis for the rows; the expert is read on the device (a CUDA graph captures it), after the
    wait for the kernel ahead (so no group is read early), and K's splits write float32 sums
    that are added up after."""
    M, K = x.shape
    P, N = experts.numel(), qweight.shape[2]
    if qweight.dim() != 3 or qweight.shape[1] * 8 != K or P % M or not 1 <= P <= MAX_ROWS or x.dtype not in HALVES:
        raise ValueError(f"experts' rows take x [M, K] in half precision, a stack [E, K/8, N] and 1 to {MAX_ROWS} "
                         f"rows, a multiple of M; not x {list(x.shape)} {x.dtype}, qweight {list(qweight.shape)}, "
                         f"{P} rows")
    x = x.contiguous()
    if not mma_suits(x[:1], qweight[0], group_size):
        raise ValueError(f"experts' rows need the mma path's shapes (groups of whole 32-input steps, outputs in fours)")
    c = mma_config(1, N, K, group_size)
    groups = K // group_size
    per_split = triton.cdiv(groups, c.split_k)
    split_k = triton.cdiv(groups, per_split)
    out = torch.empty((P, N), dtype=x.dtype, device=x.device)
    partial = out if split_k == 1 else torch.empty((split_k, P, N), dtype=torch.float32, device=x.device)
    _int4_mma_kernel[(triton.cdiv(N, c.block_n), split_k, P)](
        x, qweight, zeros, scales, partial, partial, partial, 1, N, x.stride(0), per_split,
        split_k, groups, HALVES[x.dtype], experts, P // M, P * N, GROUP_SIZE=group_size, J=c.block_n // 16,
        BLOCK_M=1, BF16=x.dtype == torch.bfloat16, SPLIT=split_k > 1, SUMS=False, EARLY=0,
        EMULATE=knobs.runtime.interpret, EXPERTS=True, PDL=PDL, num_warps=1, num_stages=c.num_stages, **LAUNCH)
    return out if split_k == 1 else partial.sum(dim=0).to(x.dtype)
