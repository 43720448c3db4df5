"""Mixtral-8x7B's layers on one GPU: our engine against transformers' MixtralForCausalLM.
Prints JSON (and writes it to --out): each engine's decode tokens/s at batch 1 and 64 and its
workload tokens/s, their ratios, the batch-1 roofline and the fraction reached, and whether the
targets are met.

Random weights of Mixtral-8x7B's per-layer shapes (hidden 4,096, eight experts of 14,336 with
two per token, 32 query and 8 KV heads, vocabulary 32,000, bf16) on fewer layers than its 32,
so that each engine holds the model alone on one 80 GB H100 (16 layers: 47 GB of weights):

    python benchmarks/mixtral.py --out $OUT/mixtral.json

What one run does (4 to 7 minutes expected on an H100; never past --time-limit, 540 s):
 1. writes the config and tokenizer, no weights (make_checkpoint.py, weights=False);
 2. our engine in a child process (load format dummy, prefix caching off): decode tokens/s at
    batch 1 and 64 with 128 tokens of context (multi_gpu.py's `decode_rate`), then the
    256-request workload (throughput.py's: prompts and outputs of 100-1,024 tokens, greedy,
    ignore_eos), all requests added at once;
 3. once that process has exited, transformers in another: MixtralForCausalLM made from the
    config on the GPU, its weights drawn as ours are; `generate_batch` on the first
    --peer-num-prompts of the same requests (each generating their mean output length, as
    throughput.py runs it), then `generate` with a static cache on the same decode prompts
    (eager: transformers' compilation takes minutes; --peer-compile to have it);
 4. the copy bandwidth, and the batch-1 roofline over it: the bytes one decoded token must
    read (each layer's attention, router, norms and two of its eight experts, the LM head, one
    embedding row, the KV cache).
Each child saves its figures after each measurement; one still running when its share of the
time is spent is stopped, and the report holds what it had measured and says so.

Quantized experts (and attention), our engine alone (transformers cannot run these random
layouts): `--quantize gptq|awq|fp8` draws the weights in that layout on the GPU (load format
dummy) on all the model's layers, or writes them to --checkpoint and reads them back with
`--write-weights`; `--mixtral-8x22b` takes Mixtral-8x22B's shape. The roofline then counts the
quantized bytes (4-bit words with their scales and zeros, or e4m3), and the target is issue
#37's fraction of it (0.7 for 4-bit, 0.8 for fp8):

    python benchmarks/mixtral.py --mixtral-8x22b --quantize gptq --out $OUT/mixtral-8x22b-gptq.json
    python benchmarks/mixtral.py --quantize fp8 --out $OUT/mixtral-fp8.json
    python benchmarks/mixtral.py --quantize gptq --write-weights --checkpoint /tmp/mixtral-gptq

On a CPU, with small sizes, the same run checks the script end to end in a minute (its
timings there say nothing):

    python benchmarks/mixtral.py --num-layers 2 --hidden-size 64 --intermediate-size 128 \\
        --head-dim 16 --vocab-size 512 --dtype float32 --num-prompts 8 --min-len 8 --max-len 32 \\
        --peer-num-prompts 4 --decode-batches 1,4 --decode-context 16 --decode-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import static_cache_decode  # noqa: E402
from benchmarks.make_checkpoint import GROUP_SIZE, MIXTRAL, MIXTRAL_8X22B, SHAPE, make  # noqa: E402
from benchmarks.multi_gpu import decode_prompts, decode_rate, run_all, throughput_figures  # noqa: E402
from benchmarks.roofline import copy_bandwidth  # noqa: E402
from benchmarks.throughput import generate_batch_figures, make_prompts, output_lens  # noqa: E402
from server.models.loader import fill_random_weights  # noqa: E402

TARGET_DECODE_OVER_ROOFLINE = 1.5  # issue #6: batch-1 decode time at most 1.5x the roofline's
TARGET_WORKLOAD_OVER_TRANSFORMERS = 5.0  # and at least 5x transformers' tokens/s on the workload
TARGET_ROOFLINE_FRACTION = {"gptq": 0.7, "awq": 0.7, "fp8": 0.8}  # issue #37: quantized batch-1 decode
# bytes a quantized linear layer reads per weight: 4-bit words, a 16-bit scale and an 8-bit zero point per
# group of GROUP_SIZE inputs; e4m3 (one float32 scale per output channel is left out)
QUANTIZED_BYTES_PER_WEIGHT = {"gptq": 0.5 + 3 / GROUP_SIZE, "awq": 0.5 + 3 / GROUP_SIZE, "fp8": 1.0}
CPU_CACHE_BLOCKS = 64  # transformers' paged cache on a CPU (a small check), not 60% of the RAM


def workload(args) -> tuple[list[list[int]], list[int]]:
    return (make_prompts(args.num_prompts, args.min_len, args.max_len, args.vocab_size, args.seed),
            output_lens(args.num_prompts, args.min_len, args.max_len, args.seed))


def save(figures: dict, path: str) -> None:
    """Replaces the file whole, so that a child stopped mid-write leaves the last complete one."""
    Path(path + ".part").write_text(json.dumps(figures))
    os.replace(path + ".part", path)


def measure_ours(args) -> None:
    from server.config import EngineArgs
    from server.engine.llm_engine import LLMEngine

    figures: dict = {}
    start = time.perf_counter()
    engine = LLMEngine(EngineArgs(model=str(args.checkpoint), dtype=args.dtype,
                                  load_format="auto" if args.write_weights else "dummy",
                                  enable_prefix_caching=False, max_num_seqs=256))
    figures.update(ready_after_s=time.perf_counter() - start, kv_cache_tokens=engine.config.cache.max_total_tokens,
                   weight_bytes=sum(p.numel() * p.element_size() for p in engine.runner.model.parameters()),
                   decode_tokens_per_s={})
    save(figures, args.figures)
    for batch in args.decode_batches:
        figures["decode_tokens_per_s"][str(batch)] = decode_rate(
            engine, batch, args.decode_context, args.decode_tokens, args.vocab_size)
        save(figures, args.figures)
    prompts, lens = workload(args)
    run_all(engine, prompts[:2], [4, 4])  # warm-up, as the peer's
    figures["workload"] = throughput_figures(engine, prompts, lens)
    save(figures, args.figures)


def measure_transformers(args) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    figures: dict = {}
    start = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.checkpoint), dtype=getattr(
            torch, args.dtype), attn_implementation="sdpa").eval()
    with torch.no_grad():  # our engine's random weights: the routers spread tokens over experts alike
        fill_random_weights(model, args.seed)
    figures.update(version=transformers.__version__, ready_after_s=time.perf_counter() - start,
                   experts_implementation=getattr(model.config, "_experts_implementation", None))
    save(figures, args.figures)
    try:  # paged attention where this transformers has it; else generate_batch pages SDPA itself
        model.set_attn_implementation("paged|sdpa")
    except (ValueError, KeyError):
        pass
    prompts, lens = workload(args)
    count = min(args.peer_num_prompts, args.num_prompts)
    cache_blocks = None if torch.cuda.is_available() else CPU_CACHE_BLOCKS
    figures["workload"] = {"attn_implementation": model.config._attn_implementation,
                           **generate_batch_figures(model, prompts[:count], lens[:count], 1, cache_blocks)}
    save(figures, args.figures)
    model.set_attn_implementation("sdpa")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    figures["static_cache"] = {"compiled": args.peer_compile}
    for batch in args.decode_batches:
        rows = decode_prompts(batch, args.decode_context, args.vocab_size)
        figures["static_cache"][str(batch)] = static_cache_decode(model, rows, args.decode_tokens, args.peer_compile)
        save(figures, args.figures)


def in_child(which: str, seconds: float) -> dict:
    """Run `which` in a fresh process (the whole GPU to itself), stopped after `seconds`:
    the figures it saved, and how it ended."""
    seconds = max(1.0, seconds)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "figures.json")
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", which, "--figures", path]
        try:
            code = subprocess.run(command, timeout=seconds).returncode
            ended = "finished" if code == 0 else f"failed with exit code {code} (its stderr is above)"
        except subprocess.TimeoutExpired:
            ended = f"stopped at its time limit of {seconds:.0f} s"
        figures = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    return {**figures, "ended": ended}


def active_bytes_per_token(config: dict, context: float, itemsize: int, quantize: str | None = None) -> dict:
    """What one sequence's decoded token reads: each layer's attention weights, router, norms
    and two experts, the final norm, the LM head, one embedding row and `context` tokens of KV.
    `quantize`: the attention and experts are held in that format."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    elements = {
        "attention": layers * (h * (q + 2 * kv) + q * h),
        "experts": layers * config["num_experts_per_tok"] * 3 * h * config["intermediate_size"],
        "router_and_norms": layers * (config["num_local_experts"] * h + 2 * h) + h,
        "lm_head_and_embedding_row": config["vocab_size"] * h + h,
        "kv_cache": round(context * layers * 2 * kv),
    }
    parts = {name: n * itemsize for name, n in elements.items()}
    if quantize:
        for name in ("attention", "experts"):
            parts[name] = round(elements[name] * QUANTIZED_BYTES_PER_WEIGHT[quantize])
    return {**parts, "total": sum(parts.values())}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(args, ours: dict, peer: dict, bandwidth: float, device: str) -> dict:
    config = json.loads((args.checkpoint / "config.json").read_text())
    active = active_bytes_per_token(config, args.decode_context + args.decode_tokens / 2,
                                    getattr(torch, args.dtype).itemsize, args.quantize)
    roofline = bandwidth / active["total"]
    ours_decode = ours.get("decode_tokens_per_s", {})
    peer_decode = {b: f["decode_tokens_per_s"] for b, f in peer.get("static_cache", {}).items() if b != "compiled"}
    batch1 = ours_decode.get("1")
    workload_ratio = ratio(ours.get("workload", {}).get("tokens_per_s"), peer.get("workload", {}).get("tokens_per_s"))
    time_over_roofline = ratio(roofline, batch1)
    if args.quantize:
        target = TARGET_ROOFLINE_FRACTION[args.quantize]
        fraction = ratio(batch1, roofline)
        targets = {f"batch1_decode_at_least_{target}_of_roofline": None if fraction is None else fraction >= target}
    else:
        targets = {
            f"batch1_decode_within_{TARGET_DECODE_OVER_ROOFLINE}x_of_roofline":
                None if time_over_roofline is None else time_over_roofline <= TARGET_DECODE_OVER_ROOFLINE,
            f"workload_at_least_{TARGET_WORKLOAD_OVER_TRANSFORMERS:.0f}x_transformers":
                None if workload_ratio is None else workload_ratio >= TARGET_WORKLOAD_OVER_TRANSFORMERS}
    return {
        "benchmark": "mixtral", "device": device, "dtype": args.dtype, "quantize": args.quantize,
        "weights": "written and read" if args.write_weights else "drawn on the device (dummy)",
        "shape": {k: config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts",
                                         "num_experts_per_tok", "num_attention_heads", "num_key_value_heads",
                                         "head_dim", "vocab_size")},
        "workload": {"num_prompts": args.num_prompts, "prompt_len": [args.min_len, args.max_len],
                     "output_len": [args.min_len, args.max_len], "transformers_num_prompts": args.peer_num_prompts},
        "decode_context": args.decode_context, "decode_tokens": args.decode_tokens,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "batch1_roofline": {"bytes_per_token": active, "decode_tokens_per_s": roofline,
                            "engine_fraction": ratio(batch1, roofline),
                            "engine_time_over_roofline_time": time_over_roofline},
        "engine": ours, "transformers": peer,
        "engine_over_transformers": {
            **{f"decode_batch_{b}": ratio(rate, peer_decode.get(b)) for b, rate in ours_decode.items()},
            "workload_tokens_per_s": workload_ratio},
        "targets": targets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/mixtral-bench"),
                        help="where the config and tokenizer are written")
    parser.add_argument("--num-layers", type=int, help="default: 16 in bf16, the model's own when quantized")
    parser.add_argument("--hidden-size", type=int, help="default: the model's")
    parser.add_argument("--intermediate-size", type=int, help="default: the model's")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, help="default: the model's")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--mixtral-8x22b", action="store_true", help="Mixtral-8x22B's shape, not 8x7B's")
    parser.add_argument("--quantize", choices=sorted(TARGET_ROOFLINE_FRACTION),
                        help="attention and experts in this format; our engine alone")
    parser.add_argument("--write-weights", action="store_true",
                        help="write the weights to --checkpoint and read them (else drawn on the device)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100, help="of prompts and of outputs")
    parser.add_argument("--max-len", type=int, default=1024, help="of prompts and of outputs")
    parser.add_argument("--peer-num-prompts", type=int, default=64,
                        help="transformers runs the first N requests of the workload")
    parser.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--decode-context", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--peer-compile", action="store_true",
                        help="let transformers compile its static-cache decoding (minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--peer-seconds", type=float, default=240,
                        help="of the time limit, what is kept for transformers")
    parser.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--figures", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = {**SHAPE, **(MIXTRAL_8X22B if args.mixtral_8x22b else MIXTRAL)}
    args.num_layers = args.num_layers or (None if args.quantize else 16)
    for name in ("hidden_size", "intermediate_size", "vocab_size"):
        setattr(args, name, getattr(args, name) or shape[name])
    if args.child:
        (measure_ours if args.child == "ours" else measure_transformers)(args)
        return
    started = time.perf_counter()
    deadline = started + args.time_limit
    make(args.checkpoint, args.num_layers, args.seed, mixtral=True, weights=args.write_weights, quantize=args.quantize,
         sizes={"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                "head_dim": args.head_dim, "vocab_size": args.vocab_size}, mixtral_8x22b=args.mixtral_8x22b)
    if args.quantize:  # transformers cannot run random GPTQ, AWQ or fp8 layouts: our engine alone
        ours = in_child("ours", deadline - time.perf_counter() - 15)
        peer = {"ended": "not run: the weights are quantized"}
    else:
        ours = in_child("ours", deadline - time.perf_counter() - args.peer_seconds)
        peer = in_child("transformers", deadline - time.perf_counter() - 15)  # 15 s: the bandwidth, the report
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    text = json.dumps({**report(args, ours, peer, bandwidth, name),
                       "seconds": time.perf_counter() - started}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
