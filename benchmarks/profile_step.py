"""Where a decode step's time goes: wall time against GPU kernel time, and the top kernels.
Prints a JSON list, one entry per batch size (and one for full prefill steps with --prefill):
wall ms a step, the host's ms a step in each part of the engine's step, GPU kernel ms a step,
idle ms, and the top kernels' ms a step.

With programmatic dependent launch (an H100: server/kernels/launch.py) a kernel starts while the one
before it drains and waits for it on the device, so its recorded time includes that wait: the
kernel times then add up to more than the step (the norm after a gemv, the merge after the
split attention look slow), and `idle_ms_per_step` can go negative. With KERNELS_PDL=0 in the
environment each kernel's time is its own (the step's wall time is then a little longer).
`benchmarks/kernel_bench/gemv.py`, `decode_attention.py` and `moe_kernel.py` time the kernels alone.

    python benchmarks/profile_step.py --model /tmp/mistral-7b --batch-sizes 1,256 [--prefill] [--quantize fp8]

`--adapters N` serves N random LoRA adapters (benchmarks/lora.py's, `--rank`) and spreads the
requests over them, to see what their updates cost a step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.config import EngineArgs  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.sampling_params import LoRARequest, SamplingParams  # noqa: E402


# The device's kernels (a CPU run, a check of the script, records host activity only).
ACTIVITIES = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_breakdown(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Milliseconds per step spent in each part of `LLMEngine.step` (collect includes the wait)."""
    spent: dict[str, float] = defaultdict(float)
    originals = []

    def wrap(owner, name):
        fn = getattr(owner, name)
        originals.append((owner, name))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += (time.perf_counter() - start) * 1000 / steps
        setattr(owner, name, timed)

    for owner, name in ((engine.scheduler, "schedule"), (engine, "_chunk"), (engine.runner, "_pack"),
                        (engine.runner, "_unpack"), (engine.runner, "forward"), (engine.runner, "sample"),
                        (engine, "_finish_outputs"), (engine.runner, "collect"), (engine, "_advance")):
        wrap(owner, name)
    for _ in range(steps):
        engine.step()
    for owner, name in originals:  # the class's methods again (a bound method kept on its instance is a cycle)
        delattr(owner, name)
    return dict(spent)


def decode_profile(engine: LLMEngine, batch: int, prompt_len: int, steps: int, adapters: list[str]) -> dict:
    """`adapters`: the requests' adapters, taken in turn (none: the base model)."""
    rng = random.Random(batch)
    # Sequences prefilled first decode while the others prefill: none may finish before the end.
    prefill_steps = -(-batch * prompt_len // engine.config.scheduler.max_batch_prefill_tokens)
    max_tokens = prefill_steps + steps * 3 + 10
    for index in range(batch):
        engine.add_request([rng.randrange(100, 32000) for _ in range(prompt_len)],
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           lora_request=LoRARequest(adapters[index % len(adapters)]) if adapters else None)
    while any(s.num_computed_tokens < s.num_prompt_tokens for r in engine.requests.values() for s in r.sequences):
        engine.step()
    for _ in range(5):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    host = host_breakdown(engine, steps)
    with profile(activities=ACTIVITIES) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    kernels = kernel_times(prof, steps)
    running = len(engine.requests)  # still the whole batch
    for request_id in list(engine.requests):
        engine.abort(request_id)
    gpu = sum(kernels.values())
    top = list(kernels.items())[:14]
    return {"batch": batch, "running_at_end": running, "wall_ms_per_step": wall * 1000,
            "gpu_kernel_ms_per_step": gpu, "host_ms_per_step": host, "idle_ms_per_step": wall * 1000 - gpu,
            "top_kernels_ms_per_step": dict(top)}


def kernel_times(prof, steps: int) -> dict[str, float]:
    """Milliseconds per step in each CUDA kernel of a profile, the longest first."""
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:90]] += event.device_time_total / 1000 / steps
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def prefill_profile(engine: LLMEngine, prompt_len: int, steps: int) -> dict:
    """Steps that prefill only: enough prompts of `prompt_len` to fill each step's token budget
    (max_batch_prefill_tokens), one token generated each, so that every step profiled is a
    full prefill step (after one unprofiled step that compiles what it needs)."""
    budget = engine.config.scheduler.max_batch_prefill_tokens
    rng = random.Random(prompt_len)

    def add_step_of_prompts():
        for _ in range(max(1, budget // prompt_len)):
            engine.add_request([rng.randrange(100, 32000) for _ in range(prompt_len)],
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))

    def run_steps(count: int) -> None:
        for _ in range(count):
            add_step_of_prompts()
            while engine.has_unfinished_requests():  # the prefill, then its token read back
                engine.step()

    run_steps(1)
    sync()
    start = time.perf_counter()
    run_steps(steps)
    sync()
    wall = (time.perf_counter() - start) / steps
    with profile(activities=ACTIVITIES) as prof:
        run_steps(steps)
        sync()
    kernels = kernel_times(prof, steps)
    return {"prefill_tokens_per_step": max(1, budget // prompt_len) * prompt_len, "prompt_len": prompt_len,
            "wall_ms_per_step": wall * 1000, "gpu_kernel_ms_per_step": sum(kernels.values()),
            "top_kernels_ms_per_step": dict(list(kernels.items())[:14])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prefill", action="store_true",
                        help="also profile steps that prefill a full budget of --prompt-len prompts")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (every kernel launched from the host)")
    parser.add_argument("--quantize", help="the engine's --quantize (fp8; a GPTQ/AWQ checkpoint needs none)")
    parser.add_argument("--max-num-seqs", type=int, help="the largest batch, up to which decode graphs are captured "
                                                         "(default: the largest of --batch-sizes, 256 with --prefill)")
    parser.add_argument("--stream-outputs", action="store_true",
                        help="build every request's output each step, as the server does (LLM.generate does not)")
    parser.add_argument("--adapters", type=int, default=0, help="random LoRA adapters to spread the requests over")
    parser.add_argument("--rank", type=int, default=16, help="the adapters' rank")
    args = parser.parse_args()
    adapters = {}
    if args.adapters:
        from benchmarks.lora import write_adapters

        model = Path(args.model)
        adapters = write_adapters(model, args.adapters, args.rank, model.parent / f"{model.name}-lora-r{args.rank}")
    engine = LLMEngine(EngineArgs(model=args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                  max_num_seqs=args.max_num_seqs or (256 if args.prefill else max(args.batch_sizes)),
                                  enforce_eager=args.eager, enable_prefix_caching=False,
                                  lora_adapters=adapters or None, max_lora_rank=max(args.rank, 16)))
    engine.stream_outputs = args.stream_outputs
    profiles = [decode_profile(engine, b, args.prompt_len, args.steps, list(adapters)) for b in args.batch_sizes]
    if args.prefill:
        profiles.append(prefill_profile(engine, args.prompt_len, max(1, args.steps // 10)))
    print(json.dumps(profiles, indent=2))


if __name__ == "__main__":
    main()
