"""The fused MoE kernel (server/kernels/fused_moe.py) on one Mixtral-8x7B layer, against the time
to read the experts its tokens picked at the copy rate. Prints JSON: per token count the layer's
time in ms and the fraction of that roofline, for the default path, for the grouped kernel
where gemv's expert rows take the layer, and with --sweep for the fastest tiles.

A layer is gate+up, SiLU-and-multiply, down and the weighted sum (bf16), replayed from a CUDA
graph; its bytes are those of the experts its tokens picked, once each. Where the layer takes
gemv's expert rows (one or two tokens), the grouped kernel with its default tiles is timed
beside it. With `--sweep`, every tile configuration of the grid below, each checked against
the default's output before it is timed.

    python benchmarks/kernel_bench/moe_kernel.py --sweep [--tp 2]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from server.kernels.fused_moe import GEMV_PAIRS, MoEConfig, default_config, fused_moe  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2


def layer_inputs(tokens: int, inter: int, seed: int = 0):
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(EXPERTS, 2 * inter, HIDDEN, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, inter, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    probs = torch.randn(tokens, EXPERTS, generator=g, device="cuda").softmax(-1)
    weights, ids = probs.topk(TOP_K, dim=-1)
    return x, w13, w2, weights / weights.sum(-1, keepdim=True), ids


def sweep_configs(num_pairs: int) -> list[MoEConfig]:
    block_ms = [16] if num_pairs <= 64 else [64, 128]
    return [MoEConfig(m, n, k, w, s) for m, n, k, w, s in itertools.product(
        block_ms, [32, 64, 128], [64, 128], [4, 8], [3, 4])]


def fastest(configs: list, call, check, roofline_ms: float) -> dict | None:
    """The fastest of `configs`, each first run once and its output checked (`check`), then
    timed from a CUDA graph of `call(config)`; one that fails to launch (a tile too large for
    shared memory) is skipped."""
    best = None
    for config in configs:
        try:
            got = call(config)
        except Exception as error:
            print(f"skip {config}: {type(error).__name__}", file=sys.stderr)
            continue
        check(got)
        ms = graph_ms(lambda: call(config))
        if best is None or ms < best["ms"]:
            best = {"config": config.__dict__, "ms": ms, "fraction_of_roofline": roofline_ms / ms}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--tp", type=int, default=1, help="ranks the experts' intermediate dimension is split over")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    inter = INTER // args.tp
    bandwidth = copy_bandwidth()
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        x, w13, w2, weights, ids = layer_inputs(tokens, inter)
        experts_hit = ids.unique().numel()
        weight_bytes = experts_hit * 3 * inter * HIDDEN * 2
        roofline_ms = weight_bytes / bandwidth * 1000
        expected = fused_moe(x, w13, w2, weights, ids)
        close = dict(rtol=2e-2, atol=1e-2 * expected.abs().max().item())  # bf16 roundings in different places
        grouped = default_config(tokens * TOP_K)
        row = {"tokens": tokens, "experts_read": experts_hit, "roofline_ms": roofline_ms,
               "default": {"config": "gemv expert rows" if tokens * TOP_K <= GEMV_PAIRS else grouped.__dict__,
                           "ms": graph_ms(lambda: fused_moe(x, w13, w2, weights, ids))}}
        if tokens * TOP_K <= GEMV_PAIRS:
            torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, grouped), expected, **close)
            row["grouped"] = {"config": grouped.__dict__,
                              "ms": graph_ms(lambda: fused_moe(x, w13, w2, weights, ids, grouped))}
        for entry in ("default", "grouped"):
            if entry in row:
                row[entry]["fraction_of_roofline"] = roofline_ms / row[entry]["ms"]
        if args.sweep:
            row["best"] = fastest(sweep_configs(tokens * TOP_K), lambda c: fused_moe(x, w13, w2, weights, ids, c),
                                  lambda got: torch.testing.assert_close(got, expected, **close), roofline_ms)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"benchmark": "fused_moe", "device": torch.cuda.get_device_name(), "tp": args.tp,
                      "copy_bandwidth_bytes_per_s": bandwidth, "by_tokens": rows}, indent=2))


if __name__ == "__main__":
    main()
