"""One sequence alone: time to first token at several prompt lengths, and decode tokens/s.
Prints one JSON object: the engine's TTFT per prompt length, its decode tokens/s, KV cache
tokens and the bytes a decoded token reads; the copy rate, the roofline decode rate and the
fraction of it reached; with --peer, transformers' decode rate and TTFT and the ratio.

Against the roofline (all weights and the KV cache read once per decoded token, at the
copy bandwidth measured in the same run) and, with `--peer`, against transformers'
`generate` with a static cache and torch.compile on the same model, in the same process.

    python benchmarks/make_checkpoint.py /tmp/mistral-7b
    python benchmarks/latency.py --model /tmp/mistral-7b --peer
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.roofline import copy_bandwidth  # noqa: E402
from server.config import EngineArgs  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.sampling_params import SamplingParams  # noqa: E402


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(length)]


def run_alone(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds from the first token to the last)."""
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    start = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter()
    return first - start, time.perf_counter() - first


def engine_figures(args, prompts: dict[int, list[int]]) -> dict:
    engine = LLMEngine(EngineArgs(model=args.model, dtype="bfloat16", enable_prefix_caching=False,
                                  max_batch_prefill_tokens=max(args.prompt_lens), max_num_seqs=args.max_num_seqs))
    run_alone(engine, prompts[args.decode_context], 8)  # warm-up
    ttft = {}
    for length in args.prompt_lens:
        run_alone(engine, prompts[length], 1)
        ttft[length] = min(run_alone(engine, prompts[length], 1)[0] for _ in range(3))
    _, decode = run_alone(engine, prompts[args.decode_context], args.decode_tokens + 1)
    one_at_a_time = None
    if args.sync_too:  # the same engine, each step read back before the next is scheduled
        engine.async_scheduling = False
        _, one_at_a_time = run_alone(engine, prompts[args.decode_context], args.decode_tokens + 1)
        engine.async_scheduling = True
    model = engine.runner.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # A token reads one row of the embedding table (all of it only as a tied LM head).
    read = params - (0 if model.config.tie_word_embeddings else
                     sum(p.numel() * p.element_size() for p in model.embed_tokens.parameters()))
    kv_bytes = engine.runner.kv_bytes_per_token() * (args.decode_context + args.decode_tokens / 2)
    figures = {"ttft_ms": {str(k): v * 1000 for k, v in ttft.items()},
               "decode_tokens_per_s": args.decode_tokens / decode, "weight_bytes": params,
               "kv_cache_tokens": engine.config.cache.max_total_tokens,
               "activation_bytes": getattr(engine.runner, "activation_bytes", None),
               "decode_bytes_per_token": read + kv_bytes}
    if one_at_a_time is not None:
        figures["decode_tokens_per_s_without_async_scheduling"] = args.decode_tokens / one_at_a_time
    del engine
    torch.cuda.empty_cache()
    return figures


def static_cache_decode(model, rows: list[list[int]], decode_tokens: int, compile: bool = True) -> dict:
    """transformers `generate` on equal-length `rows` with a static cache, which it compiles
    itself unless `compile` is off (torch.compile with CUDA graphs for the decoding steps):
    the time to the first token from max_new_tokens=1, the decode rate from the difference
    between a long and a short generation."""
    ids = torch.tensor(rows, device=model.device)

    def generate(new_tokens):
        start = time.perf_counter()
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             cache_implementation="static", pad_token_id=0, disable_compile=not compile)
        out.tolist()  # waits for the device
        return time.perf_counter() - start

    for _ in range(2 if compile else 1):  # compiling needs the full length; eager only a warm start
        generate(decode_tokens + 1 if compile else 2)
    first = min(generate(1) for _ in range(3))
    whole = min(generate(decode_tokens + 1) for _ in range(2 if compile else 1))
    return {"decode_tokens_per_s": len(rows) * decode_tokens / (whole - first), "ttft_ms": first * 1000}


def peer_figures(args, prompts: dict[int, list[int]]) -> dict:
    """transformers `generate` with a static cache, compiled, on the same model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda").eval()
    figures = static_cache_decode(model, [prompts[args.decode_context]], args.decode_tokens)
    return {"decode_tokens_per_s": figures["decode_tokens_per_s"],
            f"ttft_ms_{args.decode_context}": figures["ttft_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 1024, 8192])
    parser.add_argument("--decode-context", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--peer", action="store_true", help="also run transformers (compiles: minutes)")
    parser.add_argument("--sync-too", action="store_true", help="also decode with async scheduling off")
    args = parser.parse_args()
    vocab = 32768
    prompts = {n: random_prompt(n, vocab, n) for n in {*args.prompt_lens, args.decode_context}}
    bandwidth = copy_bandwidth()
    ours = engine_figures(args, prompts)
    roofline = bandwidth / ours["decode_bytes_per_token"]
    report = {"benchmark": "latency", "model": args.model, "device": torch.cuda.get_device_name(),
              "copy_bandwidth_bytes_per_s": bandwidth, "engine": ours,
              "roofline_decode_tokens_per_s": roofline,
              "engine_fraction_of_roofline": ours["decode_tokens_per_s"] / roofline}
    if args.peer:
        peer = peer_figures(args, prompts)
        report["transformers_static_compiled"] = peer
        report["ratio_engine_over_transformers_decode"] = ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
