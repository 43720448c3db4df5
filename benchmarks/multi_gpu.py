"""Tensor parallelism on several GPUs: the same model at 1 and N shards, side by side. Prints
JSON (and writes it to --out) for the mode run: `engine`, each shard count's figures, the
speed-ups and the scaling efficiency; `http`, each shard count's start-up time, answers and
streamed decode rates; `allreduce`, the all-reduce's time per batch, eager and in a graph.

`engine`: for each shard count, in its own process (each starts and stops its own ranks):
greedy tokens of a few prompts (compared across shard counts), time to first token of a
1,024-token prompt, decode tokens/s at batch 1 and 64, and the 256-request workload of
benchmarks/throughput.py; then the speed-ups and the scaling efficiency (tokens/s at N
GPUs over N times one GPU). `http`: `python -m server --num-shard N` serving `/generate`,
`/v1/chat/completions`, and streamed decode tokens/s at batch 1 and 64 through HTTP.
`allreduce`: NCCL all-reduce time of one decode step's activations, eager and in a CUDA
graph, the cost that tensor parallelism adds to each layer (two per layer).

    python benchmarks/make_checkpoint.py /tmp/mistral-7b
    python benchmarks/multi_gpu.py engine --model /tmp/mistral-7b --shards 1,2
    python benchmarks/make_checkpoint.py /tmp/mixtral --mixtral --no-weights
    python benchmarks/multi_gpu.py http --model /tmp/mixtral --shards 2 --load-format dummy
    python benchmarks/multi_gpu.py allreduce --ranks 2 --hidden 4096 --layers 32

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 ...) where the machine's environment sets it:
every process started here inherits that environment.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import servers  # noqa: E402
from benchmarks.latency import random_prompt, run_alone  # noqa: E402
from benchmarks.throughput import make_prompts, output_lens  # noqa: E402
from benchmarks.timing import best_seconds  # noqa: E402

VOCAB = 32000  # below both Mistral (32768) and Mixtral-8x7B (32000) vocabularies
PARITY_TOKENS = 64


def run_all(engine, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, list]:
    """Add every request, step until all finish: (seconds, outputs in request order)."""
    from server.sampling_params import SamplingParams

    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
           for p, n in zip(prompts, max_tokens)]
    finished = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return time.perf_counter() - start, [finished[i] for i in ids]


def throughput_figures(engine, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    """Output tokens/s of all the requests added at once."""
    seconds, outputs = run_all(engine, prompts, max_tokens)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": seconds, "output_tokens": generated, "tokens_per_s": generated / seconds}


def decode_prompts(batch: int, context: int, vocab: int = VOCAB) -> list[list[int]]:
    """`decode_rate`'s prompts, for a peer to be timed on the same ones."""
    return [random_prompt(context, vocab, 1000 + i) for i in range(batch)]


def decode_rate(engine, batch: int, context: int, tokens: int, vocab: int = VOCAB) -> float:
    """Decode tokens/s of `batch` sequences together: the time of `tokens` + 1 tokens each
    less the best of three times of 1 (the prefill), as benchmarks/latency.py measures the peer."""
    prompts = decode_prompts(batch, context, vocab)
    run_all(engine, prompts, [2] * batch)  # warm-up at this batch size
    whole, _ = run_all(engine, prompts, [tokens + 1] * batch)
    first = min(run_all(engine, prompts, [1] * batch)[0] for _ in range(3))
    return batch * tokens / (whole - first)


def engine_one(args) -> dict:
    """The figures of one shard count, in this process."""
    from server.config import EngineArgs
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineArgs(model=args.model, dtype="bfloat16", tensor_parallel_size=args.tp,
                                  enable_prefix_caching=False, max_num_seqs=256,
                                  load_format=args.load_format))
    try:
        parity_prompts = [random_prompt(n, VOCAB, n) for n in (7, 50, 128, 300)]
        _, outputs = run_all(engine, parity_prompts, [PARITY_TOKENS] * len(parity_prompts))
        greedy = [list(o.outputs[0].token_ids) for o in outputs]
        long_prompt = random_prompt(1024, VOCAB, 1024)
        run_alone(engine, long_prompt, 1)
        ttft = min(run_alone(engine, long_prompt, 1)[0] for _ in range(3))
        rates = {str(b): decode_rate(engine, b, 128, args.decode_tokens) for b in (1, 64)}
        workload = throughput_figures(engine, make_prompts(256, 100, 1024, VOCAB, 0), output_lens(256, 100, 1024, 0))
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        return {"shards": args.tp, "greedy_tokens": greedy, "ttft_ms_1024": ttft * 1000,
                "decode_tokens_per_s": rates,
                "workload_256": workload,
                "weight_bytes_rank0": weight_bytes, "kv_cache_tokens": engine.config.cache.max_total_tokens}
    finally:
        engine.shutdown()


def in_child(mode: str, args, extra: list[str]) -> dict:
    """Run `mode` in a fresh process (a clean GPU and process group each time)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, os.path.abspath(__file__), mode, "--model", args.model,
                   "--load-format", args.load_format, "--decode-tokens", str(args.decode_tokens),
                   "--out", out.name, *extra]
        if args.server_log:
            command += ["--server-log", args.server_log]
        subprocess.run(command, check=True, timeout=args.timeout)
        with open(out.name) as f:
            return json.load(f)


def scaling(results: dict[int, dict], key) -> dict:
    """Speed-up over one GPU and the efficiency (tokens/s at N over N times one GPU)."""
    base = key(results[1])
    return {str(n): {"speedup": key(r) / base, "efficiency": key(r) / (n * base)}
            for n, r in results.items() if n != 1}


def engine_report(args) -> dict:
    results = {n: in_child("engine-one", args, ["--tp", str(n)]) for n in args.shards}
    report = {"benchmark": "multi_gpu_engine", "model": args.model, "device": torch.cuda.get_device_name(),
              "results": {str(n): {k: v for k, v in r.items() if k != "greedy_tokens"}
                          for n, r in results.items()}}
    first, *others = args.shards
    parity = {}
    for n in others:
        pairs = zip(results[first]["greedy_tokens"], results[n]["greedy_tokens"])
        parity[f"{n}_vs_{first}"] = [_common_prefix(a, b) for a, b in pairs]
    report["greedy_equal_prefix_of_64_tokens"] = parity
    if 1 in results:
        report["scaling_decode_batch1"] = scaling(results, lambda r: r["decode_tokens_per_s"]["1"])
        report["scaling_decode_batch64"] = scaling(results, lambda r: r["decode_tokens_per_s"]["64"])
        report["scaling_workload_256"] = scaling(results, lambda r: r["workload_256"]["tokens_per_s"])
    return report


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _stream(client, prompt: str, max_new_tokens: int) -> list[float]:
    """Arrival times of a /generate_stream request's tokens."""
    times = []
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
    async with client.stream("POST", "/generate_stream", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                times.append(time.perf_counter())
    return times


def steady_decode_rate(streams: list[list[float]]) -> float:
    """Tokens/s over the window where every stream was decoding: from the last first token to
    the first last token."""
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    tokens = sum(sum(start < t <= end for t in s) for s in streams)
    return tokens / (end - start)


async def _http_figures(url: str, decode_tokens: int) -> dict:
    import httpx

    prompt = " ".join(f"word{i}" for i in range(60))
    async with httpx.AsyncClient(base_url=url) as client:
        generated = (await client.post("/generate", timeout=600, json={
            "inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}})).json()
        chat = (await client.post("/v1/chat/completions", timeout=600, json={
            "model": "tgi", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]})).json()
        figures = {"generate": {"generated_tokens": generated["details"]["generated_tokens"],
                                "finish_reason": generated["details"]["finish_reason"]},
                   "chat": {"completion_tokens": chat["usage"]["completion_tokens"],
                            "finish_reason": chat["choices"][0]["finish_reason"]}}
        rates = {}
        for batch in (1, 64):
            await asyncio.gather(*(_stream(client, prompt, 4) for _ in range(batch)))  # warm-up
            streams = await asyncio.gather(*(_stream(client, prompt, decode_tokens) for _ in range(batch)))
            rates[str(batch)] = steady_decode_rate(streams)
        figures["decode_tokens_per_s"] = rates
        return figures


def http_one(args) -> dict:
    """Start `python -m server --num-shard N`, measure through HTTP, stop it (SIGTERM)."""
    port = servers.free_port()
    log = open(args.server_log or os.devnull, "w")
    server = subprocess.Popen([sys.executable, "-m", "server", "--model-id", args.model, "--num-shard",
                               str(args.tp), "--port", str(port), "--load-format", args.load_format,
                               "--max-concurrent-requests", "512"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            ready_after_s = servers.wait_ready(url, server, math.inf, path="/health", interval_s=1)
        except servers.ServerExited as why:
            raise RuntimeError(f"the server {why} before it was ready") from None
        figures = {"shards": args.tp, "ready_after_s": ready_after_s}
        figures.update(asyncio.run(_http_figures(url, args.decode_tokens)))
        return figures
    finally:
        server.terminate()
        if server.wait(timeout=120) != 0:
            print(f"the server exited with {server.returncode}", file=sys.stderr)
        log.close()


def _allreduce_rank(rank: int, size: int, port: int, hidden: int, layers: int, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    figures = {}
    for batch in (1, 8, 64, 256):
        x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")  # one layer's output
        eager = best_seconds(lambda: dist.all_reduce(x), repeats=200, rounds=1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # one decode step's worth: two per layer
            for _ in range(2 * layers):
                dist.all_reduce(x)
        per_step = best_seconds(graph.replay, repeats=20, rounds=1)
        figures[str(batch)] = {"eager_us": eager * 1e6, "graph_us": per_step / (2 * layers) * 1e6,
                               "graph_ms_per_decode_step": per_step * 1000}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(figures, f)
    del graph  # NCCL's teardown hangs while a graph holding its collectives exists
    dist.destroy_process_group()


def allreduce_report(args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.spawn(_allreduce_rank, args=(args.ranks, servers.free_port(), args.hidden, args.layers, out.name),
                 nprocs=args.ranks)
        with open(out.name) as f:
            figures = json.load(f)
    return {"benchmark": "nccl_all_reduce", "ranks": args.ranks, "hidden": args.hidden,
            "layers": args.layers, "device": torch.cuda.get_device_name(), "by_batch": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["engine", "http", "allreduce", "engine-one", "http-one"])
    parser.add_argument("--model")
    parser.add_argument("--shards", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=540, help="seconds for each shard count's run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--server-log", default=None, help="http: where the server's log goes")
    args = parser.parse_args()
    if args.mode == "engine":
        report = engine_report(args)
    elif args.mode == "http":
        report = {"benchmark": "multi_gpu_http", "model": args.model, "load_format": args.load_format,
                  "results": {str(n): in_child("http-one", args, ["--tp", str(n)]) for n in args.shards}}
    elif args.mode == "allreduce":
        report = allreduce_report(args)
    elif args.mode == "engine-one":
        report = engine_one(args)
    else:
        report = http_one(args)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if not args.mode.endswith("-one"):
        print(text)


if __name__ == "__main__":
    main()
