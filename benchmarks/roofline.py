"""The machine's own limits, measured in the run that reports against them."""
from __future__ import annotations

import time

import torch


def _timed(fn, repeats: int = 10, rounds: int = 3, device: str = "cuda") -> float:
    """Seconds per call: the fastest of `rounds` rounds of `repeats` calls, after a warm-up
    (a GPU that was idle runs its first milliseconds at lower clocks: one quantized.py run
    measured a 2.58 TB/s copy rate where the runs around it measured 3.0)."""
    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    best = float("inf")
    for _ in range(repeats):
        fn()
    for _ in range(rounds):
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


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
