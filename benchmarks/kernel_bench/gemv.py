"""The decode matrix product (server/kernels/gemv.py) against cuBLAS on Mistral-7B's weights,
at 1-16 rows. Prints JSON: per weight and row count the time and read rate of cuBLAS, the
default tiles and the swept best, their ratios to cuBLAS and to the copy rate, and a layer's
four products summed (progress lines on stderr).

For each weight of a layer and the LM head, and each decode batch of rows: the time of cuBLAS
(F.linear) and of the kernel under each configuration of a small sweep (each checked against
cuBLAS before it is timed), as the rate at which the weight is read; the fastest
configuration, the default's, their ratios to cuBLAS and to the device copy rate, and what
the winners save on the weights of one decoder layer. down_proj is timed as a layer calls it:
gated, its input [gate | up] multiplied as silu(gate) * up (cuBLAS after silu_and_mul). Times
are of calls replayed from a CUDA graph, as decode steps run, each call on the next of enough
copies of the weight that the L2 cache cannot hold them.

    python benchmarks/kernel_bench/gemv.py [--rows 1,2,4,8,16] [--shapes qkv,o_proj,gate_up,down,lm_head] [--fp8]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.timing import graph_us  # noqa: E402
from server.kernels.activation import silu_and_mul  # noqa: E402
from server.kernels.gemv import GemvConfig, default_config, gemv  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (32768, 4096)}  # name: (N, K)
LAYER = ("qkv", "o_proj", "gate_up", "down")
GATED = ("down",)  # shapes whose input is [gate | up], as the MLP's down_proj takes it


def weight_copies(N: int, K: int, l2_bytes: int, seed: int = 0) -> list[torch.Tensor]:
    """Enough copies of an [N, K] bf16 weight to fill the L2 cache three times over."""
    g = torch.Generator("cuda").manual_seed(seed)
    count = max(1, -(-3 * l2_bytes // (N * K * 2)))
    return [torch.randn(N, K, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def sweep_configs(M: int, K: int) -> list[GemvConfig]:
    """The tiles that came near the top of a wide sweep on an H100: float32 multiply-adds while
    their accumulators fit (64 registers a thread), the tensor cores for all batches; each
    with the splits of K that leave every split four tiles or more."""
    block_m = triton.next_power_of_2(M)
    tiles = [GemvConfig(block_n=n, block_k=k, num_warps=4, num_stages=s)
             for n, k, s in [(4, 1024, 1), (8, 1024, 1), (4, 512, 5), (8, 512, 3)] if block_m * n * k <= 64 * 128]
    tiles += [GemvConfig(block_n=n, block_k=k, num_warps=w, num_stages=s, dot=True)
              for n, k, s, w in [(64, 128, 5, 4), (64, 256, 5, 4), (64, 128, 3, 4), (64, 256, 3, 4), (64, 128, 6, 4),
                                 (128, 128, 4, 4), (128, 128, 5, 4), (128, 256, 3, 4), (128, 128, 4, 8)]]
    return [GemvConfig(**{**t.__dict__, "split_k": split}) for t, split in itertools.product(tiles, (1, 2, 4))
            if split == 1 or K // (split * t.block_k) >= 4]


def timing(nbytes: int, us: float, config: GemvConfig | None = None) -> dict:
    """One timed product: its time, the rate at which it moved `nbytes`, and its tiles."""
    row = {"us": round(us, 2), "bytes_per_s": nbytes / us * 1e6}
    return row if config is None else {"config": config.__dict__, **row}


def activations(M: int, K: int, gated: bool) -> torch.Tensor:
    """x [M, K], or [M, 2K] = [gate | up] for a gated product; seeded by M."""
    g = torch.Generator("cuda").manual_seed(M)
    return torch.randn(M, 2 * K if gated else K, generator=g, device="cuda", dtype=torch.bfloat16)


def measure(M: int, N: int, K: int, weights: list[torch.Tensor], with_sweep: bool, gated: bool = False) -> dict:
    x = activations(M, K, gated)
    nbytes = N * K * 2 + (M * x.shape[1] + M * N) * 2

    def cublas(i: int) -> torch.Tensor:
        return F.linear(silu_and_mul(x) if gated else x, weights[i % len(weights)])

    expected = cublas(0)
    row = {"cublas": timing(nbytes, graph_us(cublas))}
    default = default_config(M, N, K, gated=gated)
    row["default"] = timing(nbytes, graph_us(lambda i: gemv(x, weights[i % len(weights)], gated=gated)), default)
    row["best"] = row["default"]
    for config in sweep_configs(M, K) if with_sweep else []:
        try:
            got = gemv(x, weights[0], config, gated=gated)
        except Exception as error:  # a tile too large for shared memory or registers
            print(f"skip {config}: {type(error).__name__}", file=sys.stderr)
            continue
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
        us = graph_us(lambda i: gemv(x, weights[i % len(weights)], config, gated=gated))
        if us < row["best"]["us"]:
            row["best"] = timing(nbytes, us, config)
    row["best_vs_cublas"] = row["cublas"]["us"] / row["best"]["us"]
    row["default_vs_cublas"] = row["cublas"]["us"] / row["default"]["us"]
    return row


def measure_fp8(M: int, N: int, K: int, weights: list[torch.Tensor], with_sweep: bool, gated: bool = False) -> dict:
    """The same product with the weight in e4m3 and per-channel scales: the kernel (weight-only,
    half the bytes) against what the fp8 layers do for larger batches (per-token fp8 inputs and
    torch._scaled_mm)."""
    from server.kernels.fp8_quant import quantize_fp8_per_token
    from server.kernels.quant_reference import quantize_fp8_rows

    quantized = [quantize_fp8_rows(w) for w in weights]
    x = activations(M, K, gated)
    nbytes = N * K + (M * x.shape[1] + M * N) * 2

    def scaled_mm(i: int) -> torch.Tensor:
        q, scale = quantized[i % len(quantized)]
        x_q, x_scale = quantize_fp8_per_token(silu_and_mul(x) if gated else x)
        return torch._scaled_mm(x_q, q.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)

    def kernel(config: GemvConfig | None = None):
        def call(i: int) -> torch.Tensor:
            q, scale = quantized[i % len(quantized)]
            return gemv(x, q, config, weight_scale=scale, gated=gated)
        return call

    row = {"scaled_mm": timing(nbytes, graph_us(scaled_mm))}
    row["default"] = timing(nbytes, graph_us(kernel()), default_config(M, N, K, weight_bytes=1, gated=gated))
    row["best"] = row["default"]
    expected = kernel()(0).float()
    wider = [GemvConfig(**{**c.__dict__, "block_k": c.block_k * 2}) for c in sweep_configs(M, K) if c.split_k == 1]
    for config in wider + sweep_configs(M, K) if with_sweep else []:
        try:
            got = kernel(config)(0)
        except Exception as error:  # a tile too large for shared memory or registers
            print(f"skip fp8 {config}: {type(error).__name__}", file=sys.stderr)
            continue
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
        us = graph_us(kernel(config))
        if us < row["best"]["us"]:
            row["best"] = timing(nbytes, us, config)
    row["default_vs_scaled_mm"] = row["scaled_mm"]["us"] / row["default"]["us"]
    row["best_vs_scaled_mm"] = row["scaled_mm"]["us"] / row["best"]["us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--no-sweep", action="store_true", help="time cuBLAS and the default configuration only")
    parser.add_argument("--fp8", action="store_true", help="also the e4m3 weights (against torch._scaled_mm)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    rows_list = [int(m) for m in args.rows.split(",")]
    results = []
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        weights = weight_copies(N, K, l2_bytes)
        for M in rows_list:
            row = {"shape": name, "N": N, "K": K, "rows": M, "weight_copies": len(weights), "gated": name in GATED,
                   **measure(M, N, K, weights, not args.no_sweep, name in GATED)}
            for key in ("cublas", "default", "best"):
                row[key]["fraction_of_copy"] = row[key]["bytes_per_s"] / bandwidth
            if args.fp8:
                row["fp8"] = measure_fp8(M, N, K, weights, not args.no_sweep, name in GATED)
                for key in ("scaled_mm", "default", "best"):
                    row["fp8"][key]["fraction_of_copy"] = row["fp8"][key]["bytes_per_s"] / bandwidth
                row["fp8"]["default_vs_bf16_cublas"] = row["cublas"]["us"] / row["fp8"]["default"]["us"]
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
        del weights
    layer = {}  # rows -> the four weights of a decoder layer, summed
    for M in rows_list:
        mine = [r for r in results if r["rows"] == M and r["shape"] in LAYER]
        if len(mine) == len(LAYER):
            layer[M] = {key: round(sum(r[key]["us"] for r in mine), 2) for key in ("cublas", "default", "best")}
    print(json.dumps({"benchmark": "gemv", "device": torch.cuda.get_device_name(),
                      "copy_bandwidth_bytes_per_s": bandwidth, "l2_bytes": l2_bytes,
                      "layer_us_by_rows": layer, "by_shape": results}, indent=2))


if __name__ == "__main__":
    main()
