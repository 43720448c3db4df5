"""The paged prefill-attention kernel (server/kernels/prefill_attention.py) on Mistral-7B's attention
shape (32 query heads over 8 KV heads of 128, 16-token pages, bf16 cache, shuffled blocks).
Prints JSON: per case one layer's attention in us (and TFLOP/s for prompts alone, with --sweep
every tile configuration's time, fastest first); for mixed steps the split path's time, the
prefill kernel's alone and their ratio.

Cases: prompts alone (`7x585`: seven fresh prompts of 585 tokens), and mixed steps as the
256-request workload makes them (`mixed74`: those prompts beside 74 decoding sequences of
100-1,100 tokens), each timed as one layer's attention from a CUDA graph. A mixed step is timed
both ways: as the attention layer runs it (the decode kernel for the one-token sequences, the
prefill kernel for the rest) and through the prefill kernel alone; the two outputs are
compared. The cache is one layer's, so the prompts' K/V may stay in L2 between calls, as a
step's do after the rotary kernel writes them just before. With `--sweep`, a grid of tile configurations on each prompts-only case, checked
against the default's output, fastest first; FLOPs are those of causal attention.

    python benchmarks/kernel_bench/prefill_attention.py [--cases 7x585,1x1024,1x4096,1x8192,mixed74,mixed200] [--sweep]
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

from benchmarks.timing import graph_us  # noqa: E402
from server.kernels.decode_attention import decode_attention  # noqa: E402
from server.kernels.prefill_attention import PrefillConfig, prefill_attention  # noqa: E402
from server.runtime.model_runner import decode_splits  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CASES = "7x585,1x1024,1x4096,1x8192,mixed74,mixed200"
SCALE = HEAD_DIM ** -0.5


def step(context_lens: list[int], query_lens: list[int], seed: int = 0):
    """q, a cache holding every context, and the step's metadata (int64, as the runner's)."""
    g = torch.Generator("cuda").manual_seed(seed)
    blocks_each = [-(-c // PAGE) for c in context_lens]
    order = torch.randperm(sum(blocks_each), generator=g, device="cuda").tolist()
    width, used, tables = max(blocks_each), 0, []
    for n in blocks_each:
        tables.append(order[used:used + n] + [0] * (width - n))
        used += n
    shape = (sum(blocks_each), PAGE, KV_HEADS, HEAD_DIM)
    caches = [torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    meta = dict(block_tables=torch.tensor(tables, dtype=torch.int32, device="cuda"),
                cu_query_lens=torch.tensor([0, *itertools.accumulate(query_lens)], device="cuda"),
                context_lens=torch.tensor(context_lens, device="cuda"), max_query_len=max(query_lens))
    return q, caches, meta


def prompts_case(q, caches, meta, sweep: bool) -> dict:
    def run(config: PrefillConfig | None):
        return lambda _: prefill_attention(q, *caches, meta["block_tables"], meta["cu_query_lens"],
                                           meta["context_lens"], meta["max_query_len"], SCALE, None, config=config)

    lens = (meta["cu_query_lens"][1:] - meta["cu_query_lens"][:-1]).tolist()
    flops = sum(2 * 2 * n * (n + 1) / 2 * HEAD_DIM * HEADS for n in lens)
    default_us = graph_us(run(None))
    report = {"us": round(default_us, 1), "tflops": round(flops / default_us / 1e6, 1)}
    if sweep:
        expected = run(None)(0)
        swept = {}
        for bm, bn, warps, stages, heads in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3), (1, 2, 4)):
            config = PrefillConfig(bm, bn, warps, stages, heads)
            torch.testing.assert_close(run(config)(0), expected, atol=2e-2, rtol=2e-2)
            swept[f"{bm}x{bn} w{warps} s{stages} h{heads}"] = round(graph_us(run(config)), 1)
        report["swept"] = dict(sorted(swept.items(), key=lambda item: item[1]))
    return report


def mixed_case(num_decoding: int) -> dict:
    rng = random.Random(num_decoding)
    contexts = [rng.randint(100, 1100) for _ in range(num_decoding)] + [585] * 7
    query_lens = [1] * num_decoding + [585] * 7
    q, caches, meta = step(contexts, query_lens)
    singles = torch.tensor(range(num_decoding), device="cuda")
    multis = torch.tensor(range(num_decoding, len(contexts)), device="cuda")
    args = (meta["block_tables"], meta["cu_query_lens"], meta["context_lens"], meta["max_query_len"], SCALE, None)

    def split(_):  # as server/layers/attention.py runs a mixed step
        out = torch.empty_like(q)
        decode_attention(q, *caches, meta["block_tables"], meta["context_lens"], SCALE, None,
                         decode_splits(num_decoding, KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count),
                         out=out, seq_ids=singles, cu_query_lens=meta["cu_query_lens"])
        return prefill_attention(q, *caches, *args, out=out, seq_ids=multis)

    def alone(_):
        return prefill_attention(q, *caches, *args)

    torch.testing.assert_close(split(0), alone(0), atol=2e-2, rtol=2e-2)
    split_us, alone_us = graph_us(split), graph_us(alone)
    return {"split_us": round(split_us, 1), "prefill_kernel_alone_us": round(alone_us, 1),
            "ratio": round(alone_us / split_us, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--sweep", action="store_true", help="a grid of tiles on the prompts-only cases")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name()}
    for case in args.cases.split(","):
        if case.startswith("mixed"):
            report[case] = mixed_case(int(case.removeprefix("mixed")))
        else:
            count, length = (int(x) for x in case.split("x"))
            report[case] = prompts_case(*step([length] * count, [length] * count), args.sweep)
        print(json.dumps({case: report[case]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
