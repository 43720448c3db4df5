"""Reading a 4-bit product's deferred sums (kernels/int4_gemv.py) in the kernel that consumes it.

Deferred sums are int64 counts of SUM_UNIT (kernels/quant_reference.py) that the product's
splits of K added up atomically. The reader turns them into values as finish_sums does (int64
-> float32 -> the model dtype) and sets them back to zero, ready for the next product.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.quant_reference import SUM_UNIT

UNIT = tl.constexpr(SUM_UNIT)
PER_UNIT = tl.constexpr(1 / SUM_UNIT)  # the units in 1.0, for the product that writes the sums


@triton.jit
def read_values(at, mask, dtype: tl.constexpr):
    """The values at `at`: as they are, or, where they are deferred sums, in `dtype` (and the
    sums zeroed)."""
    x = tl.load(at, mask=mask, other=0)
    if x.dtype == tl.int64:
        tl.store(at, tl.zeros_like(x), mask=mask)
        x = (x.to(tl.float32) * UNIT).to(dtype)
    return x
