"""Guided decoding's cost: a batch of constrained requests against the same batch unconstrained.
Prints one JSON object: each batch's output tokens/s, wall and CPU seconds, the host's mask
filling time a step, and the constrained over the unconstrained rate.

One run, one engine: the same prompts are generated with and without a JSON schema (each
request one of `json_schemas.py`'s dozen, as the items of an array so that the grammar stays
open for the whole output), greedy, every request `--max-tokens` long (`ignore_eos`). Prints
one JSON object: output tokens/s of each batch, their ratio, the host time spent filling the
grammar masks per step, and the process's CPU time (all threads), which other work on a
shared machine disturbs less than the wall clock.

    python benchmarks/guided_throughput.py                      # SmolLM2 (embedded default), CPU
    python benchmarks/guided_throughput.py --model /tmp/mistral-7b --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.json_schemas import SCHEMAS  # noqa: E402
from benchmarks.throughput import make_prompts  # noqa: E402
from server import LLM, SamplingParams  # noqa: E402


class MaskClock:
    """Wraps the engine's mask filling to add up the host time it takes."""

    def __init__(self, guidance):
        self.seconds, self.steps = 0.0, 0
        fill = guidance.allowed_tokens

        def timed(rows, matchers):
            start = time.perf_counter()
            allowed = fill(rows, matchers)
            self.seconds += time.perf_counter() - start
            self.steps += 1
            return allowed

        guidance.allowed_tokens = timed


def array_of(schema: dict) -> dict:
    """An array of `schema`'s instances (its definitions kept at the root, where its
    references point)."""
    items = {key: value for key, value in schema.items() if key != "$defs"}
    return {"type": "array", "items": items, **({"$defs": schema["$defs"]} if "$defs" in schema else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id, directory or .gguf (default: SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=32, help="requests in each batch")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each batch; the best counts")
    args = parser.parse_args()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False)
    config = llm.engine.config
    prompts = make_prompts(args.batch, args.prompt_len, args.prompt_len, config.model.vocab_size, 0)
    schemas = [array_of(schema) for schema, _, _ in SCHEMAS.values()]
    plain = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    guided = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                             guided_json=schemas[i % len(schemas)]) for i in range(args.batch)]
    llm.generate(prompts[:2], [plain, guided[0]], use_tqdm=False)  # warm-up
    clock = MaskClock(llm.engine.guidance)
    report = {"benchmark": "guided_throughput", "model": config.model_id, "device": config.device,
              "dtype": config.dtype, "vocab_size": config.model.vocab_size, "batch": args.batch,
              "prompt_len": args.prompt_len, "output_len": args.max_tokens, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads()}
    runs = {"unconstrained": plain, "constrained": guided}
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows both alike
        for name, params in runs.items():
            clock.seconds = clock.steps = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if seconds < best[name]:
                best[name] = seconds
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                report[name] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                                "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
                if clock.steps:
                    report[name]["mask_fill_ms_per_step"] = round(clock.seconds / clock.steps * 1e3, 3)
    report["ratio_constrained_over_unconstrained"] = round(
        report["constrained"]["tokens_per_s"] / report["unconstrained"]["tokens_per_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
