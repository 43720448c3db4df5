"""Reading a 4-bit product's deferred sums (kernels/int4_gemv.py) in the kernel that consumes it.

Deferred sums are int64 counts of SUM_UNIT (server/kernels/quant_reference.py) that the product's
splits of K added up atomically. The reader turns them into values as finish_sums does (int64
-> float32 -> the model dtype) and sets them back to zero, ready for the next product.

The zeros are stored only after a barrier that every thread of the program reaches once its
loads are done: the compiler may give the store another mapping of elements to threads than
the load (in the norm at Mistral-7B's width it gave the load 8 elements a thread and the store
2), and without the barrier a thread could zero sums that another has not read yet. Triton's
interpreter (the CPU tests) runs a program as whole-tensor steps and cannot show that race; on
an H100 it corrupted the norm's output in every row. tests/test_kernels.py has the GPU test;
tests/hopper_compile.py looks for zeros stored without the barrier in the compiled code.
"""
from __future__ import annotations

import triton
import triton.language as tl

from server.kernels.quant_reference import SUM_UNIT

UNIT = tl.constexpr(SUM_UNIT)
PER_UNIT = tl.constexpr(1 / SUM_UNIT)  # the units in 1.0, for the product that writes the sums


@triton.jit
def settle(x):
    """After the loads of every deferred read of a kernel (x: any of them): a barrier, so that
    every thread's loads are performed before any thread's zeros (above). Nothing for values
    that are not sums. A kernel that reads several tensors loads them all and then settles
    once, so that their loads are in flight together (a barrier waits for the loads before it)."""
    if x.dtype == tl.int64:
        tl.debug_barrier()


@triton.jit
def released(at, x, mask, dtype: tl.constexpr):
    """x as loaded from `at`, after `settle`: in `dtype`, and the sums set back to zero where
    they are deferred sums; else x as it is."""
    if x.dtype == tl.int64:
        tl.store(at, tl.zeros_like(x), mask=mask)
        x = (x.to(tl.float32) * UNIT).to(dtype)
    return x
