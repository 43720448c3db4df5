"""The machine's own limits, measured in the run that reports against them."""
from __future__ import annotations

import time

import torch


def _timed(fn, repeats: int = 5, device: str = "cuda") -> float:
    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(device: str = "cuda") -> float:
    """Copy within the device's memory, bytes/s (each byte read once and written once)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _timed(lambda: dst.copy_(src), device=device)


def matmul_rate() -> float:
    """bf16 matmul, FLOP/s."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192 ** 3 / _timed(lambda: a @ b)
