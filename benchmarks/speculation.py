"""Speculative decoding (n-gram prompt lookup, or a draft model) against plain decoding, in
one run. Prints one JSON object: for each batch size, output tokens/s with and without
speculation, their ratio, the share of proposed tokens the model kept, and whether the outputs
were equal; with a draft model, also the milliseconds a step spends in the draft's proposing
(its catch-up and its one-token steps) beside the rest of the step (the model's check).

The prompts are grounded in their input, where lookup pays: rewrite or copy a given passage,
edit given code. Greedy; each engine in the same process, one after the other.

    python benchmarks/speculation.py                              # SmolLM2 (the default model)
    python benchmarks/speculation.py --model /tmp/mistral-7b --speculate 4 --batch-sizes 1,8
    python benchmarks/speculation.py --model /tmp/mistral-7b --draft-model /tmp/mistral-2l --speculate 4
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

from server import LLM, SamplingParams  # noqa: E402

PASSAGE = ("The river rose slowly through the night, and by morning the lower fields were under water. "
           "The farmers moved their animals to the hill behind the village, where the old church stood, "
           "and waited for the rain to stop. It stopped on the third day, and the river went back to its bed.")
CODE = ("def total(items):\n    result = 0\n    for item in items:\n        result = result + item.price * item.count\n"
        "    return result\n")
TASKS = [f"Copy this passage exactly, word for word:\n\n{PASSAGE}",
         f"Rewrite this passage in the present tense:\n\n{PASSAGE}",
         f"Rename `result` to `subtotal` in this code and show the whole function:\n\n{CODE}",
         f"Repeat this code, adding a docstring:\n\n{CODE}"]


def run(llm: LLM, batch: int, max_tokens: int, clock: "StepClock | None" = None) -> tuple[float, list[list[int]]]:
    conversations = [[{"role": "user", "content": TASKS[i % len(TASKS)]}] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.chat(conversations[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    if clock is not None:
        clock.reset()
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ids = [o.outputs[0].token_ids for o in outputs]
    return sum(map(len, ids)) / seconds, ids


class StepClock:
    """Wall-clock time of an engine's steps and of its proposer's work within them (which
    reads its last picks back, so its time covers the draft's device work)."""

    def __init__(self, engine):
        self.reset()
        engine.step = self._timed(engine.step, "step_s")
        engine.proposer.propose = self._timed(engine.proposer.propose, "propose_s")

    def _timed(self, call, total: str):
        def timed(*args):
            start = time.perf_counter()
            try:
                return call(*args)
            finally:
                setattr(self, total, getattr(self, total) + time.perf_counter() - start)
                if total == "step_s":
                    self.steps += 1

        return timed

    def reset(self) -> None:
        self.steps, self.step_s, self.propose_s = 0, 0.0, 0.0

    def per_step_ms(self) -> dict:
        steps = max(self.steps, 1)
        return {"draft_ms_a_step": 1e3 * self.propose_s / steps,
                "check_ms_a_step": 1e3 * (self.step_s - self.propose_s) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id, directory or .gguf (default: SmolLM2)")
    parser.add_argument("--draft-model", default=None, help="a draft model's directory or id (default: n-gram lookup)")
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", help="float32: outputs that must equal plain decoding's exactly")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    plain, plain_ids = {}, {}
    llm = LLM(args.model, dtype=args.dtype)
    for size in sizes:
        plain[size], plain_ids[size] = run(llm, size, args.max_tokens)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    config = {"method": "draft_model", "model": args.draft_model} if args.draft_model else {"method": "ngram"}
    llm = LLM(args.model, dtype=args.dtype, speculative_config={**config, "num_speculative_tokens": args.speculate})
    report = {"benchmark": "speculation", "model": args.model or "SmolLM2-135M-Instruct",
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "proposer": args.draft_model or "ngram", "speculate": args.speculate, "dtype": args.dtype,
              "batches": {}}
    for size in sizes:
        engine = llm.engine
        proposed, kept = engine.num_speculated, engine.num_accepted
        clock = StepClock(engine)
        rate, ids = run(llm, size, args.max_tokens, clock)
        del engine.step, engine.proposer.propose  # the clock's wrappers
        proposed, kept = engine.num_speculated - proposed, engine.num_accepted - kept
        report["batches"][size] = {"plain_tokens_per_s": plain[size], "speculative_tokens_per_s": rate,
                                   "ratio": rate / plain[size], "proposed": proposed,
                                   "kept_share": kept / proposed if proposed else None,
                                   "same_outputs": ids == plain_ids[size]}
        if args.draft_model:
            report["batches"][size].update(clock.per_step_ms())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
