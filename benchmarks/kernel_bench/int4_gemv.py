"""The 4-bit decode product (server/kernels/int4_gemv.py) on Mistral-7B's layer weights, against
bf16. Prints JSON: per weight and row count the time and read rate of bf16 cuBLAS, the bf16 gemv,
int4_matmul, int4_gemv's default, its deferred-sums path and the swept best (with the ratios
and the fraction of the copy rate), and a layer's four products summed; with --batched, each
weight's time through int4_matmul, dequantized first, and bf16 cuBLAS at larger batches.

For each weight of a decoder layer (group size 128, random GPTQ-packed words) and each decode
batch of rows: the time of bf16 cuBLAS (F.linear on a dense weight of the same shape), of the
bf16 gemv kernel (server/kernels/gemv.py), of int4_matmul, and of int4_gemv under its default
configuration and a small sweep (each configuration checked against x times the dequantized
weight before it is timed; one that fails or does not compile is recorded, not fatal), and up
to 8 rows the mma path leaving deferred sums (`deferred`, a memset standing in for the zeroing
that the kernel reading them does in a step). Rates
are of the bytes each reads: the packed weight (qweight + scales + zeros) for 4-bit, the dense
weight for bf16. The sweep: each tile below at its default split of K, then the fastest tile
at a quarter, half and twice that split. Times are of calls replayed from a CUDA graph, as
decode steps run, each call on the next of enough copies of the weight that the L2 cache
cannot hold them.

    python benchmarks/kernel_bench/int4_gemv.py [--rows 1,2,4,8,16] [--shapes qkv,o_proj,gate_up,down] [--out FILE]
    python benchmarks/kernel_bench/int4_gemv.py --batched 16,64,128,192,256   # int4_matmul or dequantize first
    TRITON_INTERPRET=1 python benchmarks/kernel_bench/int4_gemv.py --smoke   # tiny shapes on the CPU, no timing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernel_bench.gemv import LAYER, SHAPES  # noqa: E402
from benchmarks.timing import graph_us  # noqa: E402
from server.kernels.gemv import gemv  # noqa: E402
from server.kernels.int4_gemv import (MMA_MAX_ROWS, Int4GemvConfig, config_for, int4_gemv, mma_config,  # noqa: E402
                                split_counters, split_k_for)
from server.kernels.int4_matmul import int4_matmul  # noqa: E402
from server.kernels.quant_reference import dequantize_int4, finish_sums, group_of_each_input, unpack_int4  # noqa: E402

GROUP_SIZE = 128
FMA_TILES = [Int4GemvConfig(block_n=n, block_k=k, num_warps=w, num_stages=s)
             for n, k, w, s in [(128, 128, 1, 1), (128, 128, 1, 2), (128, 64, 1, 1), (256, 64, 1, 1),
                                (256, 128, 2, 1), (512, 128, 4, 1),
                                # deeper pipelines of the first H100 sweep's winners (64-input tiles)
                                (128, 64, 1, 2), (128, 64, 1, 3), (256, 64, 1, 2), (256, 64, 2, 2),
                                # 32-input tiles: a few rows' sums still fit
                                (128, 32, 1, 1), (128, 32, 1, 2), (128, 32, 1, 3), (256, 32, 2, 2)]]
DOT_TILES = [Int4GemvConfig(block_n=n, block_k=128, num_warps=w, num_stages=s, dot=True)
             for n, w, s in [(64, 4, 3), (64, 4, 5), (128, 8, 3), (256, 16, 3)]]
MMA_TILES = [Int4GemvConfig(block_n=n, block_k=GROUP_SIZE, num_warps=1, num_stages=1, mma=True) for n in (32, 64)]


def packed_copies(N: int, K: int, l2_bytes: int, device: str, dtype: torch.dtype, seed: int = 0) -> list[tuple]:
    """Enough copies of a random 4-bit weight (qweight, zeros, scales) to fill the L2 cache
    three times over."""
    g = torch.Generator(device).manual_seed(seed)
    groups = K // GROUP_SIZE
    count = max(1, -(-3 * l2_bytes // (N * K // 2)))
    return [(torch.randint(-2**31, 2**31, (K // 8, N), generator=g, device=device, dtype=torch.int64).to(torch.int32),
             torch.randint(0, 16, (groups, N), generator=g, device=device, dtype=torch.uint8),
             (torch.rand(groups, N, generator=g, device=device) * 0.004).to(dtype)) for _ in range(count)]


def sweep_tiles(M: int) -> list[Int4GemvConfig]:
    """Multiply-adds while their sums fit (a thread's float32 [rows, block_k/8, its columns] in
    64 registers), the tensor cores for every batch, and the mma path for up to 8 rows."""
    rows = 1 << (M - 1).bit_length()
    return [t for t in FMA_TILES if rows * t.block_k // 8 * t.block_n // (32 * t.num_warps) <= 64] + DOT_TILES + \
        (MMA_TILES if M <= MMA_MAX_ROWS else [])


def rate(nbytes: int, us: float, config: Int4GemvConfig | None = None) -> dict:
    row = {"us": round(us, 2), "bytes_per_s": nbytes / us * 1e6}
    return row if config is None else {"config": dataclasses.asdict(config), **row}


def measure(M: int, N: int, K: int, packed: list[tuple], dense: list[torch.Tensor], time) -> dict:
    device, dtype = dense[0].device, dense[0].dtype
    x = torch.randn(M, K, generator=torch.Generator(device).manual_seed(M), device=device).to(dtype)
    qweight, zeros, scales = packed[0]
    weight = dequantize_int4(unpack_int4(qweight, dim=0), zeros, scales, group_of_each_input(K, GROUP_SIZE, device))
    expected = F.linear(x.float(), weight)  # [M, N]
    del weight
    counters = split_counters(N, device)
    int4_bytes = sum(t.numel() * t.element_size() for t in packed[0])

    def int4(config: Int4GemvConfig | None):
        return lambda i: int4_gemv(x, *packed[i % len(packed)], None, GROUP_SIZE, config, counters)

    row = {"bf16_cublas": rate(N * K * 2, time(lambda i: F.linear(x, dense[i % len(dense)]))),
           "bf16_gemv": rate(N * K * 2, time(lambda i: gemv(x, dense[i % len(dense)]))),
           "int4_matmul": rate(int4_bytes, time(lambda i: int4_matmul(x, *packed[i % len(packed)], None, GROUP_SIZE))),
           "default": rate(int4_bytes, time(int4(None)), config_for(x, qweight, GROUP_SIZE)),
           "failures": []}
    if M <= MMA_MAX_ROWS:  # the mma path leaving deferred sums, as a decode step's layers run it
        sums, mma = torch.zeros(M, N, dtype=torch.int64, device=device), mma_config(M, N, K, GROUP_SIZE)
        torch.testing.assert_close(finish_sums(int4_gemv(x, qweight, zeros, scales, None, GROUP_SIZE, mma, sums=sums),
                                               torch.float32), expected, rtol=2e-2, atol=2e-2)

        def deferred(i):
            int4_gemv(x, *packed[i % len(packed)], None, GROUP_SIZE, mma, sums=sums)
            sums.zero_()  # in a step, the kernel that reads the sums zeroes them: here a memset of ~1 us
        row["deferred"] = rate(int4_bytes, time(deferred), mma)

    def timed(config: Int4GemvConfig) -> dict | None:
        try:
            got = int4(config)(0)
            torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
        except Exception as error:  # a tile too large for shared memory or registers, or a wrong one
            row["failures"].append({"config": dataclasses.asdict(config), "error": f"{type(error).__name__}: "
                                                                                   f"{str(error)[:300]}"})
            return None
        return rate(int4_bytes, time(int4(config)), config)

    tiles = [dataclasses.replace(t, split_k=split_k_for(N, K, t.block_n, t.block_k, t.num_warps))
             for t in sweep_tiles(M)]
    swept = [r for r in map(timed, tiles) if r]
    if swept:
        fastest = Int4GemvConfig(**min(swept, key=lambda r: r["us"])["config"])
        splits = {max(1, fastest.split_k * f // 4) for f in (1, 2, 8)} - {fastest.split_k}
        swept += [r for r in (timed(dataclasses.replace(fastest, split_k=s)) for s in sorted(splits)) if r]
    row["best"] = min(swept + [row["default"]], key=lambda r: r["us"])
    row["swept"] = [{"config": r["config"], "us": r["us"]} for r in swept]
    for key in ("default", "best"):
        row[f"{key}_vs_bf16_gemv"] = row["bf16_gemv"]["us"] / row[key]["us"]
        row[f"{key}_vs_int4_matmul"] = row["int4_matmul"]["us"] / row[key]["us"]
    return row


def batched(rows_list: list[int], l2_bytes: int) -> dict:
    """Larger decode batches, which the 4-bit layers send through int4_matmul up to
    FUSED_MAX_ROWS rows and dequantize first above: each layer weight's time both ways, and
    bf16 cuBLAS's, in microseconds."""
    from server.kernels.int4_matmul import int4_dequantize

    out = {}
    for name in LAYER:
        N, K = SHAPES[name]
        packed = packed_copies(N, K, l2_bytes, "cuda", torch.bfloat16)
        dense = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for M in rows_list:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = out.setdefault(M, {})
            row[name] = {
                "int4_matmul": graph_us(lambda i: int4_matmul(x, *packed[i % len(packed)], None, GROUP_SIZE)),
                "dequantized_matmul": graph_us(lambda i: x @ int4_dequantize(*packed[i % len(packed)], None,
                                                                             GROUP_SIZE, torch.bfloat16)),
                "bf16_cublas": graph_us(lambda i: x @ dense[i % 2])}
    for row in out.values():
        row["layer"] = {key: sum(row[name][key] for name in LAYER) for key in row[LAYER[0]]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--shapes", default=",".join(LAYER), help=f"comma-separated, of {', '.join(LAYER)}")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (TRITON_INTERPRET=1): checks the sweep's configurations, "
                             "times nothing")
    parser.add_argument("--batched", help="instead: these larger batches (e.g. 16,64,128,192,256) through "
                                          "int4_matmul and dequantized first, against bf16")
    args = parser.parse_args()
    if args.batched:
        report = batched([int(m) for m in args.batched.split(",")], torch.cuda.get_device_properties(0).L2_cache_size)
        print(json.dumps({"benchmark": "int4_batched", "device": torch.cuda.get_device_name(),
                          "microseconds_by_rows": report}, indent=2))
        return
    rows_list = [int(m) for m in args.rows.split(",")]
    if args.smoke:  # fp16: the interpreter gets bf16 dots wrong
        device, dtype, l2_bytes, bandwidth = "cpu", torch.float16, 0, None
        shapes = {name: (N // 64, K // 16) for name, (N, K) in SHAPES.items() if name in LAYER}

        def time(call) -> float:
            call(0)
            return 1.0
    else:
        from benchmarks.roofline import copy_bandwidth

        device, dtype = "cuda", torch.bfloat16
        l2_bytes, bandwidth = torch.cuda.get_device_properties(0).L2_cache_size, copy_bandwidth()
        shapes, time = SHAPES, graph_us
    results = []
    for name in args.shapes.split(","):
        N, K = shapes[name]
        packed = packed_copies(N, K, l2_bytes, device, dtype)
        g = torch.Generator(device).manual_seed(1)
        dense = [(torch.randn(N, K, generator=g, device=device) * 0.02).to(dtype)
                 for _ in range(max(1, -(-3 * l2_bytes // (N * K * 2))))]
        for M in rows_list:
            row = {"shape": name, "N": N, "K": K, "rows": M, "copies": len(packed),
                   **measure(M, N, K, packed, dense, time)}
            if bandwidth:
                for key in ("bf16_cublas", "bf16_gemv", "int4_matmul", "default", "best", "deferred"):
                    if key in row:
                        row[key]["fraction_of_copy"] = row[key]["bytes_per_s"] / bandwidth
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "swept"}), file=sys.stderr)
        del packed, dense
    layer = {}  # rows -> the four weights of a decoder layer, summed
    for M in rows_list:
        mine = [r for r in results if r["rows"] == M]
        if len(mine) == len(LAYER):
            layer[M] = {key: round(sum(r[key]["us"] for r in mine), 2)
                        for key in ("bf16_cublas", "bf16_gemv", "int4_matmul", "default", "best", "deferred")
                        if key in mine[0]}
            layer[M]["best_vs_bf16_gemv"] = layer[M]["bf16_gemv"] / layer[M]["best"]
    report = {"benchmark": "int4_gemv", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "copy_bandwidth_bytes_per_s": bandwidth, "l2_bytes": l2_bytes, "group_size": GROUP_SIZE,
              "layer_us_by_rows": layer, "by_shape": results}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
