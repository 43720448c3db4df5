"""Offline throughput: the engine against transformers' batched `generate`, in one run.

Same model, same prompts (seeded random token ids), greedy, `ignore_eos`, the same number of
new tokens for every request. Prints one JSON object with both figures and their ratio.

    python benchmarks/throughput.py                       # SmolLM2 (embedded default), CPU
    python benchmarks/throughput.py --num-prompts 24 --max-tokens 64 --device cpu
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

from server import LLM, SamplingParams  # noqa: E402
from server.models.loader import resolve_model  # noqa: E402


def make_prompts(count: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(count)]


def best_of(repeats: int, run) -> tuple[float, object]:
    """The fastest of `repeats` timed runs (shared machines add noise, never speed)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_engine(llm: LLM, args, prompts) -> dict:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    elapsed, outputs = best_of(args.repeats, lambda: llm.generate(prompts, params, use_tqdm=False))
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}


def load_transformers(args, dtype):
    from transformers import AutoModelForCausalLM

    source = resolve_model(args.model)
    if source.gguf_file:
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(source.gguf_file),
                                                    gguf_file=os.path.basename(source.gguf_file),
                                                    dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)


def run_transformers(args, prompts, dtype) -> dict:
    """Padded batched `generate` (left padding), the way transformers users batch offline."""
    model = load_transformers(args, dtype).to(args.device).eval()
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    kwargs = dict(do_sample=False, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                  pad_token_id=pad)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], **{**kwargs, "max_new_tokens": 4,
                                                             "min_new_tokens": 4})
        elapsed, out = best_of(args.repeats,
                               lambda: model.generate(ids, attention_mask=mask, **kwargs))
    generated = (out.shape[1] - width) * len(prompts)
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model id, directory or .gguf (default: SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    # Prefix caching off: repeats run the same prompts, and the peer has no such cache.
    llm = LLM(args.model, device=args.device, dtype=args.dtype, enable_prefix_caching=False)
    config = llm.engine.config
    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len,
                           config.model.vocab_size, args.seed)
    engine = run_engine(llm, args, prompts)
    del llm
    peer = run_transformers(args, prompts, getattr(torch, config.dtype))
    print(json.dumps({
        "benchmark": "throughput", "model": config.model_id, "device": config.device,
        "dtype": config.dtype, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
        "prompt_len": [args.min_prompt_len, args.max_prompt_len], "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "engine": engine,
        "transformers_generate": peer,
        "ratio_engine_over_transformers": engine["tokens_per_s"] / peer["tokens_per_s"],
    }, indent=2))


if __name__ == "__main__":
    main()
