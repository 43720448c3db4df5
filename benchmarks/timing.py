"""The timers every benchmark shares: one for host-visible calls, one for CUDA graphs.

- `best_seconds(fn)`: wall-clock seconds per call, the fastest of a few rounds after a warm-up,
  synchronising the device around each round. For whole operations (a copy, a matmul, a
  sampling step, a replayed graph, host-only Python work).
- `graph_us(call)`: a kernel as a decode step runs it, replayed from a CUDA graph of `calls`
  calls `call(0)`, `call(1)`, ... (so each call can read the next of several copies of its
  weights, which the L2 cache then cannot hold), timed with CUDA events. `graph_ms(fn)` is
  the same for one call replayed `repeats` times.

A library for the scripts beside it; running it does nothing.
"""
from __future__ import annotations

import time

import torch

CALLS, REPLAYS = 25, 2  # graph_us: calls per graph; timed replays after one warm-up replay


def best_seconds(fn, repeats: int = 10, rounds: int = 3, device: str = "cuda") -> float:
    """Seconds per call: the fastest of `rounds` rounds of `repeats` calls, after a warm-up
    round (a GPU that was idle runs its first milliseconds at lower clocks: one quantized.py run
    measured a 2.58 TB/s copy rate where the runs around it measured 3.0). Shared machines add
    noise, never speed, hence the fastest."""
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


def graph_us(call, calls: int = CALLS, replays: int = REPLAYS) -> float:
    """Mean microseconds of call(i), from a CUDA graph of `calls` calls (i = 0, 1, ...)
    replayed `replays` times back to back after one warm-up replay."""
    call(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def graph_ms(fn, repeats: int = 20) -> float:
    """Mean milliseconds of fn(), captured once in a CUDA graph and replayed `repeats` times
    (as decode steps run)."""
    return graph_us(lambda _: fn(), calls=1, replays=repeats) / 1000
