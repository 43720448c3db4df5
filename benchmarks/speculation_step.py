"""What checking proposals costs: a step that verifies N proposed tokens a sequence (its last
token and the N, sampled at every place) against a plain decode step of the same sequences, on
the model runner alone, in one run. Prints one JSON object: ms a step of each, their ratio for
each N, and the speed-up that ratio allows at the acceptance rates given (each proposal kept
with probability p, independently: 1 + p + ... + p^N tokens a step, over the ratio).

A decode step replays the CUDA graphs; a verification step is timed eagerly and replayed
from the decode graphs a row a token (server/runtime/cuda_graphs.py: decode_rows), as the
engine runs it with `--speculate N`.

    python benchmarks/speculation_step.py --model /tmp/mistral-7b --proposals 2,4,8 --batch-sizes 1,8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.config import EngineArgs  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.runtime.model_runner import SequenceChunk  # noqa: E402
from server.runtime.sampler import SamplingOptions  # noqa: E402


def step_ms(runner, chunks: list[SequenceChunk], repeats: int) -> float:
    """Milliseconds a step of `chunks`, each step waited for (as a speculating engine does)."""
    for _ in range(3):
        runner.execute(chunks)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        runner.execute(chunks)
    return (time.perf_counter() - start) * 1000 / repeats


def chunks_of(batch: int, context: int, proposals: int, block_size: int) -> list[SequenceChunk]:
    """`batch` sequences of `context` tokens computed, each with its last token and `proposals`
    more to compute (KV slots of its own blocks; the weights are random, so are the tokens)."""
    per_seq = -(-(context + proposals + 1) // block_size)
    return [SequenceChunk(token_ids=[100 + i] * (proposals + 1), start_pos=context,
                          block_table=list(range(i * per_seq, (i + 1) * per_seq)), sampling=SamplingOptions(),
                          draft_sampling=[SamplingOptions() for _ in range(proposals)])
            for i in range(batch)]


def expected_speedup(ratio: float, proposals: int, p: float) -> float:
    return sum(p ** k for k in range(proposals + 1)) / ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory (benchmarks/make_checkpoint.py)")
    parser.add_argument("--proposals", default="2,4,8")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--context", type=int, default=512, help="tokens each sequence has computed")
    parser.add_argument("--acceptance", default="0.5,0.7,0.9", help="rates for the expected speed-up")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    proposals = [int(n) for n in args.proposals.split(",")]
    sizes = [int(n) for n in args.batch_sizes.split(",")]
    rates = [float(p) for p in args.acceptance.split(",")]
    # decode graphs for as many rows as the largest check has tokens
    # (captured for checks of the most proposals, as a speculating engine's are)
    engine = LLMEngine(EngineArgs(model=args.model, dtype=args.dtype, device=args.device, enable_prefix_caching=False,
                                  max_num_seqs=max(sizes) * (max(proposals) + 1), max_graph_query_len=max(proposals) + 1))
    runner = engine.runner
    report = {"benchmark": "speculation_step", "model": args.model, "context": args.context,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "batches": {}}
    for batch in sizes:
        decode = step_ms(runner, chunks_of(batch, args.context, 0, runner.block_size), args.repeats)
        entry = {"decode_ms": decode}
        for n in proposals:
            chunks = chunks_of(batch, args.context, n, runner.block_size)
            graphs, runner.graphs = runner.graphs, None  # the check run eagerly, then from the graphs
            eager = step_ms(runner, chunks, args.repeats)
            runner.graphs = graphs
            verify = step_ms(runner, chunks, args.repeats)  # a decode graph's row a token, where they have the rows
            ratio = verify / decode
            entry[f"verify_{n}"] = {"ms": verify, "eager_ms": eager, "ratio": ratio,
                                    "expected_speedup": {str(p): expected_speedup(ratio, n, p) for p in rates}}
        report["batches"][batch] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
