"""The sampling step's random rows in one kernel: temperature, top-k, top-p and min-p, then
the exponential race's draw, one program per row and nothing sorted.

The reference is `server.runtime.sampler`'s torch path, which sorts the vocabulary once for
top-k and once more for top-p, and builds the row's Exp(1) noise as a [rows, vocab] tensor of
int64 hashes. Here each filter is a threshold on the row's logits (a positive temperature
keeps their order), found by bisection over their float32 bit patterns (ordered as the
values: `_order_key`), each step one pass over the row (in L2 after the first):
  - top-k keeps the logits at or above the k-th largest (ties kept, as the reference keeps
    them): the largest key with at least k logits at or above it;
  - top-p drops the least likely logits whose probabilities add up to at most 1 - top_p of
    the top-k survivors' (the reference's cumulative sum in ascending order, read as a
    threshold): the largest key whose mass at or below it is within that budget, never the
    most likely token's;
  - min-p drops probabilities below min_p times the largest, that is exp((x - max) / T) <
    min_p.
The draw is argmax(exp((x - max) / T) / E) over the survivors (the reference's softmax
without its common divisor), with E made in the kernel from the same counter-based hash as
`server.runtime.random.exponential_noise`: a seeded row draws the same noise either way.

Each search takes 33 passes over the row, each pass a compare (and for top-p an exp2) a logit.
Even so, on one H100 with top-k and top-p the kernel took less time than the reference at one
row and at 256, drawing the same tokens (benchmarks/kernel_bench/sampling.py). Blocks are 4,096
logits on 16 warps, and each pass compares the raw logits (the temperature's reciprocal
multiplies only the exponent) rather than dividing each by the temperature, as the reference
does once. docs/kernels.md has the figures and the variants tried.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOWEST_KEY = tl.constexpr(-(2 ** 31))  # below every key of a float32 that is not NaN
MASK32 = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _order_key(x):
    """int64 keys ordered as the float32 values `x` (NaN aside): a negative float's magnitude
    bits are flipped, so that more negative is smaller."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _mix32(x):
    """random.mix32 on int64 lanes holding 32-bit values (products wrap; the mask keeps the
    low 32 bits, which wrapping leaves exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


@triton.jit
def _logits(base, start, offs, vocab):
    """A block of the row's logits, -inf past the vocabulary."""
    inside = start + offs < vocab
    return tl.load(base + start + offs, mask=inside, other=float("-inf")), inside


@triton.jit
def _sample_kernel(logits_ptr, stride, rows_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, keys_ptr,
                   out_ptr, vocab, BLOCK: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                   MIN_P: tl.constexpr):
    i = tl.program_id(0)
    base = logits_ptr + tl.load(rows_ptr + i).to(tl.int64) * stride
    temperature = tl.load(temperature_ptr + i)
    offs = tl.arange(0, BLOCK)
    top = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        x, inside = _logits(base, start, offs, vocab)
        top = tl.maximum(top, tl.max(x, axis=0))
    top_key = _order_key(top)
    scale = 1.4426950408889634 / temperature  # exp((x - max) / T) = 2 ** ((x - max) * scale)

    kth = tl.full([], LOWEST_KEY, tl.int64)  # keys below it are dropped by top-k
    if TOP_K:
        k = tl.load(top_k_ptr + i)
        lo, hi = kth, top_key
        for _ in range(33):  # 2**32 keys, halved each time
            mid = (lo + hi + 1) >> 1
            count = 0
            for start in range(0, vocab, BLOCK):
                x, inside = _logits(base, start, offs, vocab)
                count += tl.sum((inside & (_order_key(x) >= mid)).to(tl.int32), axis=0)
            enough = count >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        kth = tl.where((k > 0) & (k < vocab), lo, kth)

    cut = tl.full([], LOWEST_KEY - 1, tl.int64)  # keys at or below it are dropped by top-p
    if TOP_P:
        p = tl.load(top_p_ptr + i)
        total = 0.0
        for start in range(0, vocab, BLOCK):
            x, inside = _logits(base, start, offs, vocab)
            kept = inside & (_order_key(x) >= kth)
            total += tl.sum(tl.where(kept, tl.exp2((x - top) * scale), 0.0), axis=0)
        budget = (1.0 - p) * total
        lo, hi = cut, top_key - 1
        for _ in range(33):
            mid = (lo + hi + 1) >> 1
            mass = 0.0
            for start in range(0, vocab, BLOCK):
                x, inside = _logits(base, start, offs, vocab)
                key = _order_key(x)
                below = inside & (key >= kth) & (key <= mid)
                mass += tl.sum(tl.where(below, tl.exp2((x - top) * scale), 0.0), axis=0)
            within = mass <= budget
            lo = tl.where(within, mid, lo)
            hi = tl.where(within, hi, mid - 1)
        cut = tl.where(p < 1.0, lo, cut)

    floor = 0.0
    if MIN_P:
        floor = tl.load(min_p_ptr + i)

    row_key = tl.load(keys_ptr + i) & MASK32
    best = tl.full([], -1.0, tl.float32)
    best_id = tl.full([], 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        x, inside = _logits(base, start, offs, vocab)
        key = _order_key(x)
        e = tl.exp2((x - top) * scale)
        kept = inside & (key >= kth) & (key > cut) & (e >= floor)
        ids = (start + offs).to(tl.int64)
        bits = _mix32(_mix32(row_key ^ ids) ^ row_key)
        noise = -tl.log(((bits >> 9).to(tl.float32) + 0.5) * (1.0 / (1 << 23)))
        score = tl.where(kept, e / noise, -1.0)
        block_best = tl.max(score, axis=0)
        at = tl.argmax(score, axis=0)
        better = block_best > best  # an earlier block keeps a tie, as torch's argmax does
        best_id = tl.where(better, (start + at).to(tl.int64), best_id)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + i, best_id)


def sample_rows(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor,
                top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                min_p: torch.Tensor | None = None, block: int = 4096) -> torch.Tensor:
    """Token ids [len(rows)] (int64) drawn from logits[rows] (float32 [*, vocab]).

    temperature, top_p, min_p: float32 [len(rows)]; top_k: int32 or int64 (0: off for the row);
    keys: int64 row keys (`random.row_key`). A filter left as None is off for every row."""
    count, vocab = len(rows), logits.shape[1]
    out = torch.empty(count, dtype=torch.int64, device=logits.device)
    if count == 0:
        return out
    unused = temperature  # a filter that is off never reads its pointer
    _sample_kernel[(count,)](
        logits, logits.stride(0), rows, temperature,
        unused if top_k is None else top_k.to(torch.int32), unused if top_p is None else top_p,
        unused if min_p is None else min_p, keys, out, vocab,
        BLOCK=min(block, triton.next_power_of_2(vocab)), TOP_K=top_k is not None, TOP_P=top_p is not None,
        MIN_P=min_p is not None, num_warps=16)
    return out
