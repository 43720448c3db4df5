"""Multi-LoRA serving against the base model, in one engine and one run.
Prints one JSON object: one-sequence decode tokens/s without and with an adapter, and the
workload's output tokens/s with no adapters and with its requests spread over every adapter,
each adapter figure with its ratio to the base model's.

The adapters are random, in PEFT's format, of one rank on all seven projections (q, k, v, o,
gate, up, down), written next to the checkpoint. One engine serves both runs, so that the
KV cache and everything else are the same: only the adapters' updates differ.

    python benchmarks/lora.py --model /tmp/mistral-7b --adapters 8 --rank 16 \\
        --num-prompts 256 --min-prompt-len 100 --max-prompt-len 1024 --min-output-len 100 --max-output-len 1024
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import random_prompt  # noqa: E402
from benchmarks.throughput import make_prompts, output_lens  # noqa: E402
from server import LLM, LoRARequest, SamplingParams  # noqa: E402

PROJECTIONS = {"q_proj": ("self_attn", "q"), "k_proj": ("self_attn", "kv"), "v_proj": ("self_attn", "kv"),
               "o_proj": ("self_attn", "o"), "gate_proj": ("mlp", "up"), "up_proj": ("mlp", "up"),
               "down_proj": ("mlp", "down")}


def write_adapters(model: Path, count: int, rank: int, root: Path) -> dict[str, str]:
    """`count` random adapters for the checkpoint at `model` (its config.json), PEFT's layout."""
    config = json.loads((model / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    sizes = {"q": (hidden, config["num_attention_heads"] * head_dim),
             "kv": (hidden, config["num_key_value_heads"] * head_dim),
             "o": (config["num_attention_heads"] * head_dim, hidden),
             "up": (hidden, config["intermediate_size"]), "down": (config["intermediate_size"], hidden)}
    adapters = {}
    for index in range(count):
        path = root / f"adapter-{index}"
        adapters[f"adapter-{index}"] = str(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for layer in range(layers):
            for name, (block, kind) in PROJECTIONS.items():
                fan_in, fan_out = sizes[kind]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
                  str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS),
            "bias": "none", "base_model_name_or_path": str(model)}))
    return adapters


def decode_rate(llm: LLM, prompt: list[int], tokens: int, lora: LoRARequest | None) -> float:
    """Output tokens/s of one sequence, from its first token to its last."""
    engine = llm.engine
    engine.stream_outputs = True  # an output each step, so that the first token's time is seen
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), lora_request=lora)
    first = None
    while engine.has_unfinished_requests():
        if engine.step() and first is None:
            first = time.perf_counter()
    engine.stream_outputs = False
    return (tokens - 1) / (time.perf_counter() - first)


def workload_rate(llm: LLM, prompts, lens, loras) -> float:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory (benchmarks/make_checkpoint.py)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-prompt-len", type=int, default=100)
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--min-output-len", type=int, default=100)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--skip-workload", action="store_true", help="only the one-sequence decode")
    args = parser.parse_args()

    model = Path(args.model)
    adapters = write_adapters(model, args.adapters, args.rank, model.parent / f"{model.name}-lora-r{args.rank}")
    llm = LLM(str(model), lora_adapters=adapters, max_lora_rank=args.rank)
    vocab = llm.engine.config.model.vocab_size
    names = list(adapters)
    prompt = random_prompt(128, vocab, 0)
    decode_rate(llm, prompt, 16, None)  # warm-up: compiles the kernels of both paths
    decode_rate(llm, prompt, 16, LoRARequest(names[0]))
    report = {"benchmark": "lora", "model": str(model), "device": torch.cuda.get_device_name()
              if torch.cuda.is_available() else "cpu", "adapters": args.adapters, "rank": args.rank}
    base = decode_rate(llm, prompt, args.decode_tokens, None)
    adapted = decode_rate(llm, prompt, args.decode_tokens, LoRARequest(names[0]))
    report["decode_tokens_per_s"] = {"base": base, "adapter": adapted, "ratio": adapted / base}
    if not args.skip_workload:
        prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, 0)
        lens = output_lens(args.num_prompts, args.min_output_len, args.max_output_len, 0)
        base = workload_rate(llm, prompts, lens, None)
        spread = [LoRARequest(names[i % len(names)]) for i in range(len(prompts))]
        adapted = workload_rate(llm, prompts, lens, spread)
        report["workload_tokens_per_s"] = {"base": base, "adapters": adapted, "ratio": adapted / base}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
