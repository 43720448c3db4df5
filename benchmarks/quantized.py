"""bf16, fp8 and 4-bit weights side by side on one GPU: one-sequence decode tokens/s, the
256-request throughput and the weights' memory, each against the bytes it must read. Prints
JSON (and writes it to --out): per variant its weight bytes, KV cache tokens, decode tokens/s
(three runs and the median) over its byte roofline, the workload's tokens/s, one layer's
matmuls at 1 and 256 rows, and each figure over bf16's.

    python benchmarks/quantized.py --out $OUT/quantized.json

What one run does (about 6 minutes on an H100, most of it loading and capturing graphs):
 1. makes two Mistral-7B-v0.3-shaped checkpoints with random weights (make_checkpoint.py):
    bf16, and GPTQ 4-bit (group 128, symmetric); fp8 is the bf16 one quantized as it loads;
 2. runs each variant in its own process, so that each gets the whole GPU (this one touches
    CUDA only afterwards): weight bytes, KV cache tokens, decode tokens/s of one sequence at
    128 tokens of context (the median of three runs), and the throughput of 256 requests with
    prompts and outputs of 100-1,024 tokens (throughput.py's GPU workload, prefix caching off);
 3. times one decoder layer's four matmuls (qkv, o, gate_up, down) alone, replayed in a CUDA
    graph, for 1 and 256 rows: the kernels against the bytes they read.
Each variant's figures are also given over bf16's, and its decode rate over the byte roofline
(weights and KV cache read once per token, at the copy bandwidth measured in the same run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import random_prompt, run_alone  # noqa: E402
from benchmarks.make_checkpoint import int4_tensors  # noqa: E402
from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.throughput import make_prompts, output_lens, run_engine  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from server import LLM  # noqa: E402
from server.config import QuantConfig  # noqa: E402
from server.layers.linear import MergedColumnParallelLinear  # noqa: E402

# variant -> (checkpoint, --quantize, --kv-cache-dtype)
VARIANTS = {"bf16": ("bf16", None, "auto"), "fp8": ("bf16", "fp8", "auto"), "gptq": ("gptq", None, "auto"),
            "bf16-fp8-kv": ("bf16", None, "fp8")}
LAYER_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def layer_matmuls(quant: QuantConfig | None, rows: int) -> dict:
    """One decoder layer's matmuls, built and loaded through the server's linear layers."""
    generator = torch.Generator("cuda").manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    layers = []
    with torch.device("cuda"):
        for name, (out_features, in_features) in LAYER_SHAPES.items():
            layer = MergedColumnParallelLinear(in_features, [(out_features, 1)], quant=quant)
            if quant is not None and quant.method == "gptq":
                tensors = int4_tensors(f"{name}.weight", (out_features, in_features), "gptq", generator, "cuda")
                for tensor_name, tensor in tensors.items():
                    layer.load_piece(0, tensor, tensor_name.rsplit(".", 1)[1])
            else:
                layer.load_piece(0, torch.randn(out_features, in_features, generator=generator, device="cuda") * 0.02)
            layer.finish_loading()
            layers.append((layer, torch.randn(rows, in_features, device="cuda")))
    torch.set_default_dtype(torch.float32)

    def step():
        for layer, x in layers:
            layer(x)

    seconds = graph_ms(step) / 1000  # replayed from a CUDA graph, as decode steps run
    weight_bytes = sum(tensor_bytes(layer) for layer, _ in layers)
    return {"microseconds": seconds * 1e6, "weight_bytes": weight_bytes, "bytes_per_s": weight_bytes / seconds}


def measure(args) -> dict:
    """One variant, in this process: its engine's memory, decode rate and throughput."""
    _, quantize, kv_cache_dtype = VARIANTS[args.measure]
    llm = LLM(args.model, dtype="bfloat16", quantization=quantize, kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=False, max_num_seqs=256)
    engine = llm.engine
    engine.stream_outputs = True  # run_alone times the first and the last token
    prompt = random_prompt(args.decode_context, 32768, 0)
    run_alone(engine, prompt, 8)  # warm-up
    # the median of three runs: on an H100 4-bit decode's runs spread over 420-432 tokens/s in
    # one process, and a single run at 408.5 was once all a variant got
    runs = sorted(run_alone(engine, prompt, args.decode_tokens + 1)[1] for _ in range(3))
    decode = runs[1]
    engine.stream_outputs = False
    throughput = None
    if not args.decode_only:
        workload = SimpleNamespace(repeats=1, trace=False)
        prompts = make_prompts(256, 100, 1024, 32768, 0)
        throughput = run_engine(llm, workload, prompts, output_lens(256, 100, 1024, 0))
    model = engine.runner.model
    weight_bytes = tensor_bytes(model)
    # A token reads one row of the embedding table (all of it only as a tied LM head).
    read_bytes = weight_bytes - (0 if model.config.tie_word_embeddings else tensor_bytes(model.embed_tokens))
    kv_bytes = engine.runner.kv_bytes_per_token()
    return {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes,
            "kv_cache_tokens": engine.config.cache.max_total_tokens,
            "decode_tokens_per_s": args.decode_tokens / decode,
            "decode_runs_tokens_per_s": [round(args.decode_tokens / seconds, 1) for seconds in runs],
            "decode_bytes_per_token": read_bytes + kv_bytes * (args.decode_context + args.decode_tokens / 2),
            "throughput": throughput}


def in_own_process(variant: str, model: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure", variant, "--model", model,
               "--decode-context", str(args.decode_context), "--decode-tokens", str(args.decode_tokens)] + \
        (["--decode-only"] if args.decode_only else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_checkpoint(path: Path, kind: str) -> None:
    """In its own process, which draws the weights on the GPU and then frees all of it."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_checkpoint.py")
    subprocess.run([sys.executable, script, str(path)] + ([] if kind == "bf16" else ["--quantize", kind]), check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/quantized-bench"))
    parser.add_argument("--variants", default="bf16,fp8,gptq", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--decode-context", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--decode-only", action="store_true", help="one-sequence decode and memory only")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    started = time.perf_counter()
    variants = args.variants.split(",")
    checkpoints = {}
    for kind in sorted({VARIANTS[v][0] for v in variants}):
        path = args.checkpoints / kind
        if not (path / "config.json").is_file():
            make_checkpoint(path, kind)
        checkpoints[kind] = str(path)
    engines = {v: in_own_process(v, checkpoints[VARIANTS[v][0]], args) for v in variants}
    bandwidth = copy_bandwidth()
    layer_quant = {"bf16": None, "fp8": QuantConfig("fp8"), "gptq": QuantConfig("gptq", 128, zero_offset=1)}
    kernels = {} if args.decode_only else \
        {rows: {v: layer_matmuls(layer_quant[v], rows) for v in variants if v in layer_quant} for rows in (1, 256)}
    report = {"benchmark": "quantized", "device": torch.cuda.get_device_name(), "copy_bandwidth_bytes_per_s": bandwidth,
              "layer_matmuls": kernels, "engines": engines}
    base = engines.get("bf16", {})
    for variant, figures in engines.items():
        if "error" in figures:
            continue
        roofline = bandwidth / figures["decode_bytes_per_token"]
        figures["roofline_decode_tokens_per_s"] = roofline
        figures["decode_fraction_of_roofline"] = figures["decode_tokens_per_s"] / roofline
        if "decode_tokens_per_s" in base:
            figures["decode_over_bf16"] = figures["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            figures["roofline_over_bf16"] = base["decode_bytes_per_token"] / figures["decode_bytes_per_token"]
            if figures["throughput"] is not None:
                figures["throughput_over_bf16"] = figures["throughput"]["tokens_per_s"] / base["throughput"]["tokens_per_s"]
            figures["weight_bytes_over_bf16"] = figures["weight_bytes"] / base["weight_bytes"]
    for rows, by_variant in kernels.items():
        for figures in by_variant.values():
            figures["speedup_over_bf16"] = by_variant["bf16"]["microseconds"] / figures["microseconds"] \
                if "bf16" in by_variant else None
    report["seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
