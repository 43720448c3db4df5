"""One-sequence decode before and after one more CUDA graph is captured in the process. Prints
one JSON object: before and after, the tokens/s of three runs and a step's host time outside
and inside its wait for the device, in us.

An engine made with `--max-num-seqs 4` captures three decode graphs (4, 2 and 1 sequences).
This script times one-sequence decode (256 tokens after a 128-token prompt, three runs), then
captures one more graph, of a single elementwise op on a tensor of its own, frees it, and
times decode again. Each timing also splits a step between the host's own work and its wait
for the device (`runner.collect`). On one H100, 4-bit (GPTQ) Mistral-7B-shaped decode went
from 434-435 to 410-412 tokens/s after that capture, its wait for the device a step from 1,533
to 1,733 us (the host's own work moved by under 100 us, down in this run, up in another), while
fp8 decode went from 320.6 to 322.8 (`--quantize fp8` on the bf16 checkpoint), all in one run.
With scratch scripts in the same session: a graph of one RMSNorm, or of 8-row pieces of a layer,
did the same to 4-bit decode, with programmatic dependent launch off too; an eager 8-row forward
or `torch.cuda.empty_cache()` alone did not; bf16 decode stayed at 186.8. So one-sequence 4-bit
decode in an engine with the default ladder of 35 graphs runs at about 411, not 435.

The cause is outside our kernels (a later session): benchmarks/graph_captures.py times a graph of
320 one-program kernels at 294 us after up to three captures in the process and 351 us from the
fourth on, about 0.18 us more a kernel, whatever the later graphs were or whether they were
kept. A 4-bit step's kernels take a few microseconds each, so it shows there; bf16's and
fp8's are long enough to hide it. `--plain-sums` moved 4-bit decode from 373-388 to 361-368
tokens/s with the same capture: not the int64 atomics either.

    python benchmarks/make_checkpoint.py /tmp/mistral-7b-gptq --quantize gptq
    python benchmarks/capture_effect.py --model /tmp/mistral-7b-gptq [--plain-sums]

`--plain-sums` runs the 4-bit products without deferred sums (each product's last split adds
the others' up), to tell whether the int64 atomic sums are what slows down.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import random_prompt, run_alone  # noqa: E402
from server.config import EngineArgs  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402


def timed_decode(engine: LLMEngine, prompt: list[int], tokens: int) -> dict:
    """Tokens/s of three runs, and the host's time a step outside and inside its wait."""
    runner = engine.runner
    spent = {"wait": 0.0, "step": 0.0, "steps": 0}
    collect, step = runner.collect, engine.step

    def timed_collect(*args, **kwargs):
        start = time.perf_counter()
        try:
            return collect(*args, **kwargs)
        finally:
            spent["wait"] += time.perf_counter() - start

    def timed_step():
        start = time.perf_counter()
        try:
            return step()
        finally:
            spent["step"] += time.perf_counter() - start
            spent["steps"] += 1

    run_alone(engine, prompt, 8)  # warm-up
    runner.collect, engine.step = timed_collect, timed_step
    try:
        rates = [round(tokens / run_alone(engine, prompt, tokens + 1)[1], 1) for _ in range(3)]
    finally:  # the class's methods again (bound methods kept on the instances would be cycles)
        del runner.collect, engine.step
    per_step = 1e6 / spent["steps"]
    return {"tokens_per_s": rates, "host_us_a_step": round((spent["step"] - spent["wait"]) * per_step, 1),
            "wait_us_a_step": round(spent["wait"] * per_step, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-num-seqs", type=int, default=4, help="the engine's (4: graphs of 4, 2 and 1)")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--quantize", help="the engine's --quantize (fp8 for a bf16 checkpoint)")
    parser.add_argument("--plain-sums", action="store_true",
                        help="4-bit products add their splits' sums themselves (no deferred int64 sums)")
    args = parser.parse_args()
    if args.plain_sums:  # before the layers are made: they take their sums buffer then
        import server.layers.int4_linear as int4_linear

        int4_linear.deferred_sums = lambda width, device: None
    cuda = torch.cuda.is_available()  # (a CPU run only checks the script)
    engine = LLMEngine(EngineArgs(model=args.model, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
                                  device="cuda" if cuda else "cpu", enable_prefix_caching=False,
                                  quantize=args.quantize))
    prompt = random_prompt(128, engine.config.model.vocab_size, 0)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "before": timed_decode(engine, prompt, args.decode_tokens)}
    if cuda:
        x = torch.zeros(16, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.add_(1)
        del graph
        gc.collect()
        torch.cuda.synchronize()
    report["after_one_more_capture"] = timed_decode(engine, prompt, args.decode_tokens)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
