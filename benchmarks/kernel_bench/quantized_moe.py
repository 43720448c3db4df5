"""The quantized MoE kernels (server/kernels/quantized_moe.py) on one Mixtral layer, against the
time to read the quantized experts its tokens picked at the copy rate, beside the bf16 fused
kernel on the same routing. Prints JSON: per format and token count the layer's time in ms,
the fraction of that roofline, and with --sweep the fastest tiles.

A layer is gate+up, SiLU-and-multiply, down and the weighted sum, replayed from a CUDA graph
(so this also shows that it captures); its bytes are those of the experts its tokens picked,
once each: 4-bit words with their bf16 scales and uint8 zero points (group 128), or e4m3 with
a float32 scale per channel. Each format's output is first checked against the torch
reference on the same weights.

    python benchmarks/kernel_bench/quantized_moe.py [--shape 8x22b] [--formats gptq,fp8] [--sweep] [--tp 2]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernel_bench.moe_kernel import fastest  # noqa: E402
from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from server.kernels.fused_moe import fused_moe  # noqa: E402
from server.kernels.quant_reference import FP8, Fp8Experts, Int4Experts  # noqa: E402
from server.kernels.quantized_moe import QuantizedMoEConfig, default_config, quantized_moe  # noqa: E402
from server.kernels.reference import fused_moe_reference  # noqa: E402

SHAPES = {"8x7b": (4096, 14336), "8x22b": (6144, 16384)}  # hidden, intermediate
EXPERTS, TOP_K, GROUP = 8, 2, 128


def int4_experts(K: int, N: int, act_order: bool, g: torch.Generator) -> Int4Experts:
    """Random words, zero points 8, scales for weights of std ~0.02; act-order: a random perm."""
    qweight = torch.randint(-2 ** 31, 2 ** 31, (EXPERTS, K // 8, N), generator=g, device="cuda",
                            dtype=torch.int64).to(torch.int32)
    zeros = torch.full((EXPERTS, K // GROUP, N), 8, dtype=torch.uint8, device="cuda")
    scales = torch.full((EXPERTS, K // GROUP, N), 0.02 / 4.6, dtype=torch.bfloat16, device="cuda")
    perm = torch.stack([torch.randperm(K, generator=g, device="cuda") for _ in range(EXPERTS)]).int() \
        if act_order else None
    return Int4Experts(qweight, zeros, scales, None, perm, GROUP)


def fp8_experts(K: int, N: int, g: torch.Generator) -> Fp8Experts:
    weight = (torch.randn(EXPERTS, N, K, generator=g, device="cuda") * 64).clamp(-448, 448).to(FP8)
    return Fp8Experts(weight, torch.full((EXPERTS, N), 0.02 / 64, device="cuda"))


def bytes_per_weight(fmt: str, K: int) -> float:
    return 1 + 4 / K if fmt == "fp8" else 0.5 + 3 / GROUP


def sweep_configs(num_pairs: int) -> list[QuantizedMoEConfig]:
    block_ms = [16] if num_pairs <= 64 else [32, 64, 128]
    by_pair = [True, False] if num_pairs <= 8 else [False]
    splits = [1, 2, 4, 8] if num_pairs <= 64 else [1]
    return [QuantizedMoEConfig(m, n, k, w, s, by_pair=p, split_k=sk) for m, n, k, w, s, p, sk in itertools.product(
        block_ms, [32, 64, 128], [64, 128], [4, 8], [3, 4], by_pair, splits)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8x7b")
    parser.add_argument("--formats", default="gptq,gptq-act-order,fp8")
    parser.add_argument("--tokens", default="1,2,4,16,64,256,1024,4096")
    parser.add_argument("--tp", type=int, default=1, help="ranks the experts' intermediate dimension is split over")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    hidden, inter = SHAPES[args.shape]
    inter //= args.tp
    bandwidth = copy_bandwidth()
    g = torch.Generator("cuda").manual_seed(0)
    dense = (torch.randn(EXPERTS, 2 * inter, hidden, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02,
             torch.randn(EXPERTS, hidden, inter, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02)
    layouts = {"gptq": lambda: (int4_experts(hidden, 2 * inter, False, g), int4_experts(inter, hidden, False, g)),
               "gptq-act-order": lambda: (int4_experts(hidden, 2 * inter, True, g),
                                          int4_experts(inter, hidden, True, g)),
               "fp8": lambda: (fp8_experts(hidden, 2 * inter, g), fp8_experts(inter, hidden, g))}
    rows = []
    for fmt in args.formats.split(","):
        w13, w2 = layouts[fmt]()
        dequantized = w13.dense(), w2.dense()  # float32 [E, N, K]: the reference's weights, made once
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
            weights, ids = torch.randn(tokens, EXPERTS, generator=g, device="cuda").softmax(-1).topk(TOP_K, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            expected = fused_moe_reference(x.float(), *dequantized, weights, ids)  # quantized_moe_reference
            close = dict(rtol=2e-2, atol=2e-2 * expected.abs().max().item())  # bf16 roundings in other places
            torch.testing.assert_close(quantized_moe(x, w13, w2, weights, ids).float(), expected, **close)
            experts_hit = ids.unique().numel()
            roofline_ms = experts_hit * 3 * inter * hidden * bytes_per_weight(fmt, hidden) / bandwidth * 1000
            ms = graph_ms(lambda: quantized_moe(x, w13, w2, weights, ids))
            row = {"format": fmt, "tokens": tokens, "experts_read": experts_hit, "roofline_ms": roofline_ms,
                   "default": {"config": default_config(tokens * TOP_K).__dict__, "ms": ms,
                               "fraction_of_roofline": roofline_ms / ms},
                   "bf16_fused_moe_ms": graph_ms(lambda: fused_moe(x, *dense, weights, ids))}
            if args.sweep:
                row["best"] = fastest(
                    sweep_configs(tokens * TOP_K), lambda c: quantized_moe(x, w13, w2, weights, ids, c),
                    lambda got: torch.testing.assert_close(got.float(), expected, **close), roofline_ms)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        del w13, w2, dequantized
        torch.cuda.empty_cache()
    print(json.dumps({"benchmark": "quantized_moe", "device": torch.cuda.get_device_name(), "shape": args.shape,
                      "tp": args.tp, "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
