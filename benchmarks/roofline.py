"""The machine's own limits, measured in the run that reports against them."""
from __future__ import annotations

import time

import torch


def _timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes/s (each byte read once and written once)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _timed(lambda: dst.copy_(src))


def matmul_rate() -> float:
    """bf16 matmul, FLOP/s."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192 ** 3 / _timed(lambda: a @ b)
