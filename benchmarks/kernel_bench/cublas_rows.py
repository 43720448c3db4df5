"""cuBLAS's products on Mistral-7B's weights at the decode batch sizes above the gemv kernel's
(server/kernels/gemv.py takes 1-16 rows), against reading each weight once at the copy rate (or its
FLOPs at the matmul rate, where that is longer). Prints JSON: per weight and row count the
time of each layout, that floor and its ratio to the faster; and a decode step's products (32
layers and the LM head) in ms, as held, with the faster layouts, and at the floor.

For each weight and number of rows: F.linear (W stored [N, K], as the layers hold it) and
x @ W with W stored [K, N] (another of cuBLAS's layouts), each from a CUDA graph with the weight
rotated over enough copies that L2 cannot hold them (timing.graph_us, as gemv.py times); then a
decode step's products (32 layers and the LM head) for each number of rows. `--blas
cublaslt` times through torch.backends.cuda.preferred_blas_library("cublaslt") instead. On
one H100 (copy rate 2.99 TB/s, matmul 791 TFLOP/s, measured in the run) a step's products at
32, 128, 192 and 256 rows took 5.38, 5.75, 6.09 and 6.58 ms as the layers hold the weights
(5.18, 5.60, 6.02 and 6.40 with the faster layout of each product) against 4.76 for the
weights' bytes; at 256 rows qkv_proj, o_proj and down_proj ran at 0.65-0.71 of their floor and
gate_up at 0.81, at 32 rows 0.78-0.98. (A scratch version of it, cuBLASLt included, gave the
README's earlier figures.)

    python benchmarks/kernel_bench/cublas_rows.py [--rows 32,64,96,128,160,192,224,256] [--blas cublaslt]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernel_bench.gemv import SHAPES, weight_copies  # noqa: E402
from benchmarks.roofline import copy_bandwidth, matmul_rate  # noqa: E402
from benchmarks.timing import graph_us  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="32,64,96,128,160,192,224,256")
    parser.add_argument("--blas", help="torch.backends.cuda.preferred_blas_library's choice (e.g. cublaslt)")
    args = parser.parse_args()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    rows = [int(m) for m in args.rows.split(",")]
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    report = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bandwidth, "matmul_flops_per_s": rate,
              "products": {}, "step_ms": {}}
    for name, (N, K) in SHAPES.items():
        weights = weight_copies(N, K, l2_bytes)
        transposed = [w.t().contiguous() for w in weights]
        for M in rows:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            floor_us = max(N * K * 2 / bandwidth, 2 * M * N * K / rate) * 1e6
            nk = graph_us(lambda i: F.linear(x, weights[i % len(weights)]))
            kn = graph_us(lambda i: x @ transposed[i % len(transposed)])
            report["products"][f"{name}@{M}"] = {"nk_us": round(nk, 1), "kn_us": round(kn, 1),
                                                 "floor_us": round(floor_us, 1),
                                                 "floor_over_best": round(floor_us / min(nk, kn), 2)}
            step = report["step_ms"].setdefault(M, {"nk": 0.0, "best": 0.0, "floor": 0.0})
            layers = 1 if name == "lm_head" else 32
            for key, us in (("nk", nk), ("best", min(nk, kn)), ("floor", floor_us)):
                step[key] = round(step[key] + layers * us / 1000, 3)
        del weights, transposed
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
