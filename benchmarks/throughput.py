"""Offline throughput: the engine against transformers on the same model and prompts, in one run.
Prints one JSON object: the engine's output tokens/s (with --trace, its time by kind of step),
the peer's and their ratio, and on CUDA the workload's roofline and the fraction reached.

Seeded random prompts, greedy, `ignore_eos`; prompt and output lengths uniform in their
ranges. The workload's roofline: no schedule can take less than the larger of
  - its matmul FLOPs (2 per parameter per token, prompts and outputs) over the bf16 rate, and
  - the bytes it must read over the copy rate: every weight once per step, for at least as
    many steps as the longest output has tokens, and each output token's whole context of
    K/V once (the 256-request workload reads about as much KV cache as weights);
both rates measured in the run. `--trace` also splits the engine's time between steps that
prefill and decode-only steps (by batch size), each against what it must read.

    python benchmarks/throughput.py                       # SmolLM2 (embedded default), CPU
    # nano-vllm's workload on the GPU: 256 requests, prompts and outputs of 100-1024 tokens
    python benchmarks/throughput.py --model /tmp/mistral-7b --device cuda --num-prompts 256 \
        --min-prompt-len 100 --max-prompt-len 1024 --min-output-len 100 --max-output-len 1024 \
        --peer generate_batch --peer-num-prompts 64 --repeats 1
    # the same with speculation on (above --speculate-max-batch-size running, it stands aside)
    python benchmarks/throughput.py --model /tmp/mistral-7b --device cuda ... --peer none --speculate 4
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workload import DATASETS, lengths  # noqa: E402
from server import LLM, SamplingParams  # noqa: E402
from server.models.loader import resolve_model  # noqa: E402


def make_prompts(count: int, min_len: int, max_len: int, vocab: int, seed: int,
                 dataset: str = "uniform") -> list[list[int]]:
    rng = random.Random(seed)  # each prompt's length drawn before its tokens, as earlier runs drew them
    return [[rng.randrange(100, vocab) for _ in range(lengths(1, min_len, max_len, dataset, rng)[0])]
            for _ in range(count)]


def output_lens(count: int, min_len: int, max_len: int, seed: int, dataset: str = "uniform") -> list[int]:
    return lengths(count, min_len, max_len, dataset, random.Random(seed + 1))


def best_of(repeats: int, run) -> tuple[float, object]:
    """The fastest of `repeats` timed runs (shared machines add noise, never speed)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_engine(llm: LLM, args, prompts, lens) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    elapsed, outputs = best_of(args.repeats, lambda: llm.generate(prompts, params, use_tqdm=False))
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    report = {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}
    if args.trace:
        report["trace"] = traced_run(llm, prompts, params)
    return report


def traced_run(llm: LLM, prompts, params) -> dict:
    """The workload once more, each step timed (a step returns once the next is queued, so in
    steady state its time is the device's): steps with prompt tokens, and decode-only steps
    by batch size, with the context tokens they read."""
    engine = llm.engine
    schedule, step = engine.scheduler.schedule, engine.step
    phases: dict[str, dict] = {}
    current = []  # the phase of the step being run

    def scheduled():
        batch = schedule()
        seqs = len(batch.seqs) if batch else 0
        name = "idle" if not seqs else "prefill" if any(n > 1 for n in batch.num_new_tokens) else \
            f"decode_{(seqs - 1) // 32 * 32 + 1}-{(seqs - 1) // 32 * 32 + 32}"
        phase = phases.setdefault(name, {"steps": 0, "seconds": 0.0, "tokens": 0, "context_tokens_read": 0})
        phase["steps"] += 1
        if seqs:
            phase["tokens"] += batch.num_tokens
            phase["context_tokens_read"] += sum(seq.num_computed_tokens + n
                                                for seq, n in zip(batch.seqs, batch.num_new_tokens))
        current[:] = [phase]
        return batch

    def timed():
        start = time.perf_counter()
        outputs = step()
        if current:
            current[0]["seconds"] += time.perf_counter() - start
        return outputs

    engine.scheduler.schedule, engine.step = scheduled, timed
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:  # the class's methods again: bound methods kept on the instances would be cycles
        del engine.scheduler.schedule, engine.step  # holding the engine (and the GPU) past `del llm`
    for phase in phases.values():
        phase["ms_per_step"] = 1000 * phase["seconds"] / phase["steps"]
    return dict(sorted(phases.items()))


def workload_roofline(llm: LLM, prompts, lens, seconds: float) -> dict:
    """The least time the workload can take on this device (see the module's docstring)."""
    from benchmarks.roofline import copy_bandwidth, matmul_rate

    model = llm.engine.runner.model
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # a step reads one embedding row per token, not the table
        weight_bytes -= sum(p.numel() * p.element_size() for p in model.embed_tokens.parameters())
    kv_bytes = llm.engine.runner.kv_bytes_per_token()
    # Output token t (t = 1 .. n-1; the first comes from the prefill) reads its prompt and t tokens.
    kv_read = sum(len(p) * (n - 1) + n * (n - 1) // 2 for p, n in zip(prompts, lens)) * kv_bytes
    flops = 2 * params * (sum(len(p) for p in prompts) + sum(lens))
    torch.cuda.empty_cache()
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    memory_s = (weight_bytes * max(lens) + kv_read) / bandwidth
    compute_s = flops / rate
    return {"copy_bytes_per_s": bandwidth, "matmul_flops_per_s": rate, "weight_bytes": weight_bytes,
            "kv_bytes_read": kv_read, "memory_bound_s": memory_s, "compute_bound_s": compute_s,
            "roofline_tokens_per_s": sum(lens) / max(memory_s, compute_s),
            "engine_fraction_of_roofline": max(memory_s, compute_s) / seconds,
            "engine_fraction_of_matmul_rate": compute_s / seconds}


def load_transformers(args, dtype):
    from transformers import AutoModelForCausalLM

    source = resolve_model(args.model)
    if source.gguf_file:
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(source.gguf_file),
                                                    gguf_file=os.path.basename(source.gguf_file),
                                                    dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)


def run_transformers(args, prompts, lens, dtype) -> dict:
    """Padded batched `generate` (left padding), the way transformers users batch offline;
    every row generates the mean output length (generate takes one length for all)."""
    model = load_transformers(args, dtype).to(args.device).eval()
    width = max(len(p) for p in prompts)
    pad = 0
    new_tokens = round(sum(lens) / len(lens))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=pad)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], **{**kwargs, "max_new_tokens": 4,
                                                             "min_new_tokens": 4})
        elapsed, out = best_of(args.repeats,
                               lambda: model.generate(ids, attention_mask=mask, **kwargs))
    generated = (out.shape[1] - width) * len(prompts)
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}


def run_generate_batch(args, prompts, lens, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="paged|sdpa")
    except (ValueError, KeyError):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    return generate_batch_figures(model.to(args.device).eval(), prompts, lens, args.repeats)


def generate_batch_figures(model, prompts, lens, repeats: int, cache_blocks: int | None = None) -> dict:
    """transformers' continuous batching (`generate_batch`, paged attention over SDPA); every
    request generates the mean output length (one length for the batch). Its paged cache takes
    90% of the free GPU memory, or 60% of the machine's on a CPU, unless `cache_blocks` caps it
    (pages of 256 tokens; transformers 5.24's `ContinuousBatchingConfig`)."""
    from transformers import GenerationConfig

    batching = {}
    if cache_blocks is not None:
        from transformers import ContinuousBatchingConfig

        batching["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=cache_blocks)
    new_tokens = round(sum(lens) / len(lens))
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=-1, pad_token_id=0)
    # generate_batch manages its own inference mode (its static buffers must stay outside it).
    model.generate_batch(prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0), **batching)
    elapsed, out = best_of(repeats, lambda: model.generate_batch(prompts, generation_config=config, **batching))
    generated = sum(len(o.generated_tokens) for o in out.values())
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed,
            "num_prompts": len(prompts), "output_len_each": new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id, directory or .gguf (default: SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64, help="output length, unless a range is given")
    parser.add_argument("--min-output-len", type=int, default=None)
    parser.add_argument("--max-output-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batch-prefill-tokens", type=int, default=4096, help="prompt tokens a step may take")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8 (half the bytes a context reads)")
    parser.add_argument("--peer", choices=["generate", "generate_batch", "none"], default="generate")
    parser.add_argument("--peer-num-prompts", type=int, default=None,
                        help="run the peer on the first N prompts only (it can take many minutes)")
    parser.add_argument("--sync-too", action="store_true", help="also run with async scheduling off")
    parser.add_argument("--trace", action="store_true", help="also time each step of one more run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    parser.add_argument("--speculate", type=int, default=0,
                        help="n-gram speculation's tokens a step (0: off), under its batch-size limit")
    parser.add_argument("--dataset", choices=DATASETS, default="uniform",
                        help="prompt and output lengths: uniform in their ranges, or ShareGPT-like (log-normal)")
    parser.add_argument("--waiting-served-ratio", type=float, default=0.0,
                        help="TGI's rule for prompts joining a decoding batch (0: whenever there is room)")
    parser.add_argument("--max-waiting-tokens", type=int, default=20)
    parser.add_argument("--max-graph-query-len", type=int, default=1,
                        help="steps of at most this many tokens a sequence replay the decode graphs")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    # Prefix caching off: repeats run the same prompts, and the peer has no such cache.
    llm = LLM(args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False,
              max_num_seqs=args.max_num_seqs, max_batch_prefill_tokens=args.max_batch_prefill_tokens,
              kv_cache_dtype=args.kv_cache_dtype,
              speculative_config={"num_speculative_tokens": args.speculate} if args.speculate else None,
              waiting_served_ratio=args.waiting_served_ratio, max_waiting_tokens=args.max_waiting_tokens,
              max_graph_query_len=args.max_graph_query_len)
    config = llm.engine.config
    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len,
                           config.model.vocab_size, args.seed, args.dataset)
    lens = output_lens(args.num_prompts, args.min_output_len or args.max_tokens,
                       args.max_output_len or args.max_tokens, args.seed, args.dataset)
    engine = run_engine(llm, args, prompts, lens)
    if args.sync_too:  # the same engine, each step read back before the next is scheduled
        llm.engine.async_scheduling = False
        engine["without_async_scheduling"] = run_engine(llm, args, prompts, lens)
    kv_tokens = config.cache.max_total_tokens
    roofline = workload_roofline(llm, prompts, lens, engine["seconds"]) if config.device.startswith("cuda") else None
    del llm
    gc.collect()  # the engine's memory goes back before the peer loads its copy of the model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report = {
        "benchmark": "throughput", "model": config.model_id, "device": config.device,
        "dtype": config.dtype, "num_prompts": args.num_prompts,
        "prompt_len": [args.min_prompt_len, args.max_prompt_len],
        "output_len": [min(lens), max(lens)], "dataset": args.dataset, "repeats": args.repeats,
        "kv_cache_tokens": kv_tokens,
        "max_batch_prefill_tokens": args.max_batch_prefill_tokens, "kv_cache_dtype": args.kv_cache_dtype,
        "speculate": args.speculate, "waiting_served_ratio": args.waiting_served_ratio,
        "max_waiting_tokens": args.max_waiting_tokens, "max_graph_query_len": args.max_graph_query_len,
        "torch_threads": torch.get_num_threads(), "engine": engine,
    }
    if roofline is not None:
        report["roofline"] = roofline
    if args.peer != "none":
        count = args.peer_num_prompts or args.num_prompts
        run = run_generate_batch if args.peer == "generate_batch" else run_transformers
        peer = run(args, prompts[:count], lens[:count], getattr(torch, config.dtype))
        report[f"transformers_{args.peer}"] = peer
        report["ratio_engine_over_transformers"] = engine["tokens_per_s"] / peer["tokens_per_s"]
    print(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
