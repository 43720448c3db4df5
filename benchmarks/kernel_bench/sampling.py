"""The sampling step's random rows: the Triton kernel (server/kernels/sampling.py) against the torch
sampler it replaces on CUDA (two sorts of the vocabulary and a [rows, vocab] noise tensor),
side by side in one run, and against reading the logits once at the copy rate. Prints JSON:
per row count and filter setting, both times in ms, their ratio, whether the tokens are the
same, and the time to read the logits once.

    python benchmarks/kernel_bench/sampling.py [--rows 1,8,64,256] [--vocab 32768]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.timing import best_seconds  # noqa: E402
from server.kernels.sampling import sample_rows  # noqa: E402
from server.runtime import sampler  # noqa: E402
from server.runtime.random import row_key  # noqa: E402

SETTINGS = {  # name: (top_k, top_p, min_p), each at temperature 0.7
    "temperature": (0, 1.0, 0.0),
    "top_k=50, top_p=0.9": (50, 0.9, 0.0),
    "top_p=0.95, min_p=0.05": (0, 0.95, 0.05),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    results = []
    for count in args.rows:
        logits = torch.randn(count, args.vocab, device="cuda") * 3
        rows = torch.arange(count, device="cuda")
        temperature = torch.full((count,), 0.7, device="cuda")
        keys = torch.tensor([row_key(1, step) for step in range(count)], device="cuda")
        for name, (top_k, top_p, min_p) in SETTINGS.items():
            values = {"top_k": top_k, "top_p": top_p, "min_p": min_p}
            warps = {name: torch.full((count,), values[name], device="cuda")
                     for name, _, neutral in sampler.WARPS if name in values and values[name] != neutral}
            ours = sample_rows(logits, rows, temperature, keys, **warps)
            reference = sampler.draw(logits[rows] / temperature[:, None], keys, warps)
            kernel_ms = 1000 * best_seconds(lambda: sample_rows(logits, rows, temperature, keys, **warps))
            torch_ms = 1000 * best_seconds(lambda: sampler.draw(logits[rows] / temperature[:, None], keys, warps))
            results.append({"rows": count, "settings": name, "kernel_ms": kernel_ms, "torch_ms": torch_ms,
                            "speedup": torch_ms / kernel_ms, "same_tokens": bool(torch.equal(ours, reference)),
                            "read_once_ms": logits.numel() * 4 / bandwidth * 1000})
    print(json.dumps({"benchmark": "sampling", "device": torch.cuda.get_device_name(), "vocab": args.vocab,
                      "copy_bandwidth_bytes_per_s": bandwidth, "results": results}, indent=2))


if __name__ == "__main__":
    main()
