"""How a graph of many small kernels replays once the process has captured more graphs. Prints
one JSON line: the timed graph's replay time in us after each number of captures in the
process, and per kernel.

Captures one graph of N dependent launches of a one-program Triton kernel, times its replays,
then captures (and frees) one more graph of a single elementwise op at a time, timing the
first graph's replays after each. On one H100 (torch 2.11, CUDA 13) 320 launches replayed in
294 us after one, two or three captures in the process and 351 us from the fourth on: about
0.18 us more a kernel, the same for 80 and 1,280 launches (73 -> 88, 1,150 -> 1,378), whether
the later graphs shared the first's memory pool, were kept, were captured in relaxed mode or
on streams of their own, or were never instantiated; making streams instead of capturing
changed nothing. benchmarks/capture_effect.py shows what it does to 4-bit one-sequence decode,
whose decode step is hundreds of kernels of a few microseconds: an engine capturing its
default ladder of graphs pays it on every step.

    python benchmarks/graph_captures.py [--nodes 320] [--captures 7]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import best_seconds  # noqa: E402


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def replay_us(graph: torch.cuda.CUDAGraph, replays: int = 200) -> float:
    """The best of three runs of `replays` back-to-back replays, per replay."""
    return round(best_seconds(graph.replay, repeats=replays) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=320, help="kernel launches in the timed graph")
    parser.add_argument("--captures", type=int, default=7, help="captures in all, the timed graph's included")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"device": "cpu", "note": "needs CUDA"}))
        return
    x = torch.zeros(128, device="cuda")

    def launches():
        for _ in range(args.nodes):
            _add_one[(1,)](x, x.numel(), BLOCK=128)

    launches()  # compiled outside the capture
    torch.cuda.synchronize()
    timed = torch.cuda.CUDAGraph()
    with torch.cuda.graph(timed):
        launches()
    by_captures = {1: replay_us(timed)}
    for count in range(2, args.captures + 1):
        other = torch.cuda.CUDAGraph()
        y = torch.zeros(16, device="cuda")
        with torch.cuda.graph(other):
            y.add_(1)
        del other
        by_captures[count] = replay_us(timed)
    print(json.dumps({"device": torch.cuda.get_device_name(), "nodes": args.nodes,
                      "replay_us_after_captures": by_captures,
                      "us_a_node": {k: round(v / args.nodes, 3) for k, v in by_captures.items()}}))


if __name__ == "__main__":
    main()
