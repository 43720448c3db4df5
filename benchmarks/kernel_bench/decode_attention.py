"""The paged decode-attention kernel (server/kernels/decode_attention.py) against the copy roofline.
Prints JSON: per batch case one layer's attention time with the engine's tiles and splits, the
time to read its K/V at the copy rate and the fraction reached, and with --sweep every
configuration's time and the fastest (progress lines on stderr).

For each decode batch (sequences x context tokens) on Mistral-7B's attention shape (32 query
heads over 8 KV heads of 128, 16-token pages, bf16 cache, block tables shuffled as a busy
cache leaves them): the time of one layer's attention with the default tiles and the number
of context splits the engine picks (model_runner.decode_splits), against the time to read the
K and V it must read at the measured copy rate; with `--sweep`, every tile configuration
and split count of a small grid, each checked against the default's output before it is
timed, and the fastest (all of them under "swept"). Times are of calls replayed from a CUDA
graph, each call on the next of enough caches (one per layer) that the L2 cache cannot hold
them. A case `256x100-1300` draws each sequence's context from that range (seeded) and
passes them longest first, as the engine does (ModelRunner._pack); `--given-order` keeps
them as drawn. `--fp8-cache`: the cache in e4m3 (`--kv-cache-dtype fp8`), half the bytes to
read.

    python benchmarks/kernel_bench/decode_attention.py [--cases 1x128,256x100-1300] [--sweep] [--fp8-cache]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.timing import graph_us  # noqa: E402
from server.kernels.decode_attention import DecodeConfig, decode_attention, kernel_choice  # noqa: E402
from server.runtime.model_runner import decode_splits  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CASES = "1x128,1x4096,16x1000,64x600-2000,160x400-1700,256x600,256x100-1300"


def contexts(case: str, given_order: bool, seed: int = 0) -> list[int]:
    """A case's context lengths: `NxC` (N of C tokens) or `NxLO-HI` (drawn, longest first
    unless `given_order`)."""
    num_seqs, lengths = case.split("x")
    if "-" not in lengths:
        return [int(lengths)] * int(num_seqs)
    rng = random.Random(seed)
    drawn = [rng.randint(*map(int, lengths.split("-"))) for _ in range(int(num_seqs))]
    return drawn if given_order else sorted(drawn, reverse=True)


def layers(num_seqs: int, context: int, l2_bytes: int, seed: int = 0, cache_dtype=torch.bfloat16):
    """q, and enough (k_cache, v_cache, block_tables) layers to fill the L2 cache three times
    (tables `context` tokens wide)."""
    g = torch.Generator("cuda").manual_seed(seed)
    blocks_each = -(-context // PAGE)
    num_blocks = num_seqs * blocks_each
    layer_bytes = 2 * num_blocks * PAGE * KV_HEADS * HEAD_DIM * cache_dtype.itemsize
    out = []
    for _ in range(max(1, -(-3 * l2_bytes // layer_bytes))):
        shape = (num_blocks, PAGE, KV_HEADS, HEAD_DIM)
        k = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16).to(cache_dtype)
        v = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16).to(cache_dtype)
        tables = torch.randperm(num_blocks, generator=g, device="cuda").view(num_seqs, blocks_each).int()
        out.append((k, v, tables))
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, out


def sweep_configs() -> list[DecodeConfig]:
    return [DecodeConfig(n, w, s) for n, w, s in itertools.product([32, 64, 128], [4, 8], [2, 3])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=CASES, help="sequences x context tokens, comma-separated")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--given-order", action="store_true", help="drawn contexts as drawn, not longest first")
    parser.add_argument("--fp8-cache", action="store_true", help="an e4m3 cache (scales 0.5 and 0.25)")
    args = parser.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.fp8_cache else torch.bfloat16
    scales = {"k_scale": 0.5, "v_scale": 0.25} if args.fp8_cache else {}
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    scale = HEAD_DIM ** -0.5
    rows = []
    for case in args.cases.split(","):
        lengths = contexts(case, args.given_order)
        num_seqs = len(lengths)
        q, caches = layers(num_seqs, max(lengths), props.L2_cache_size, cache_dtype=cache_dtype)
        lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)

        def run(config: DecodeConfig, splits: int):
            return lambda i: decode_attention(q, *caches[i % len(caches)][:2], caches[i % len(caches)][2], lens,
                                              scale, None, splits, out=out, config=config, **scales)

        roofline_us = 2 * sum(lengths) * KV_HEADS * HEAD_DIM * cache_dtype.itemsize / bandwidth * 1e6
        splits = decode_splits(num_seqs, KV_HEADS, props.multi_processor_count)
        default, _ = kernel_choice(num_seqs, KV_HEADS, splits, HEAD_DIM, args.fp8_cache, q.device)  # as the engine
        expected = decode_attention(q, *caches[0][:2], caches[0][2], lens, scale, None, splits, **scales).clone()
        us = graph_us(run(default, splits))
        row = {"case": case, "roofline_us": roofline_us,
               "default": {"config": default.__dict__, "splits": splits, "us": us, "fraction": roofline_us / us}}
        if args.sweep:
            best, row["swept"] = None, []
            for config, n in itertools.product(sweep_configs(), sorted({max(1, splits // 2), splits, 2 * splits})):
                try:
                    got = decode_attention(q, *caches[0][:2], caches[0][2], lens, scale, None, n, config=config,
                                           **scales)
                except Exception as error:  # a tile too large for shared memory
                    print(f"skip {config} splits {n}: {type(error).__name__}", file=sys.stderr)
                    continue
                torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
                us = graph_us(run(config, n))
                row["swept"].append({**config.__dict__, "splits": n, "us": round(us, 2)})
                if best is None or us < best["us"]:
                    best = {"config": config.__dict__, "splits": n, "us": us, "fraction": roofline_us / us}
            row["best"] = best
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "swept"}), file=sys.stderr)
        del caches
    print(json.dumps({"benchmark": "decode_attention", "device": torch.cuda.get_device_name(),
                      "cache_dtype": str(cache_dtype).removeprefix("torch."),
                      "copy_bandwidth_bytes_per_s": bandwidth, "by_case": rows}, indent=2))


if __name__ == "__main__":
    main()
