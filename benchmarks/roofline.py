"""The machine's own limits, measured in the run that reports against them: the device's copy
rate (bytes/s, each byte read once and written once) and its bf16 matmul rate (FLOP/s). Prints
one JSON object with both.

The other benchmarks import `copy_bandwidth` and `matmul_rate` and give their figures as a
fraction of these; run alone it says what this machine offers:

    python benchmarks/roofline.py [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import best_seconds  # noqa: E402


def copy_bandwidth(device: str = "cuda") -> float:
    """Copy within the device's memory, bytes/s (each byte read once and written once)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / best_seconds(lambda: dst.copy_(src), device=device)


def matmul_rate(device: str = "cuda") -> float:
    """bf16 matmul of two 8,192-square matrices, FLOP/s."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    return 2 * 8192 ** 3 / best_seconds(lambda: a @ b, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-matmul", action="store_true", help="the copy rate alone (a CPU's bf16 matmul is slow)")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    report = {"benchmark": "roofline", "device": name, "copy_bytes_per_s": copy_bandwidth(args.device)}
    if not args.no_matmul:
        report["matmul_flops_per_s"] = matmul_rate(args.device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
