"""Online serving: Poisson arrivals at several request rates against a running server.

Streams every request and reports, per rate, time to first token (TTFT), inter-token latency
(ITL) and end-to-end latency (mean, p50, p90, p99), request and output-token throughput, and
goodput (requests per second that met the SLO). Prompts and output lengths come from a fixed
seeded distribution: uniform in the given ranges, or ShareGPT-like (log-normal, long-tailed).
Any OpenAI-compatible server works (ours, or `transformers serve` for the peer run).

    python -m server --model-id /tmp/mistral-7b --port 8080 &
    python benchmarks/serving.py --url http://127.0.0.1:8080 --rates 1,4,16,inf --num-prompts 200 \\
        --out serving.json --plot serving.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time

import httpx


def lengths(count: int, low: int, high: int, dataset: str, rng: random.Random) -> list[int]:
    if dataset == "uniform":
        return [rng.randint(low, high) for _ in range(count)]
    # ShareGPT-like: most conversations short, a long tail (log-normal), clipped to the range.
    mu = math.log((low + high) / 4)
    return [min(high, max(low, int(rng.lognormvariate(mu, 0.8)))) for _ in range(count)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


async def one_request(client: httpx.AsyncClient, args, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": args.model_name, "prompt": [prompt], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, generated, error = [], 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    generated = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    arrivals.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = type(e).__name__
    end = time.perf_counter()
    if error or not arrivals:
        return {"ok": False, "status": error or "empty"}
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ok": True, "ttft": arrivals[0] - start, "itl": gaps, "e2e": end - start,
            "output_tokens": generated or len(arrivals)}


async def run_rate(args, rate: float, prompts, outputs) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.num_prompts + 10)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in zip(prompts, outputs):
            tasks.append(asyncio.create_task(one_request(client, args, prompt, max_tokens)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    itl = [gap for r in done for gap in r["itl"]]
    good = [r for r in done if r["ttft"] * 1000 <= args.slo_ttft_ms
            and (not r["itl"] or statistics.fmean(r["itl"]) * 1000 <= args.slo_tpot_ms)]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    ms = lambda d: {k: v * 1000 for k, v in d.items()}  # noqa: E731
    return {"request_rate": rate if math.isfinite(rate) else "inf", "duration_s": elapsed,
            "completed": len(done), "errors": errors,
            "request_throughput": len(done) / elapsed,
            "output_token_throughput": sum(r["output_tokens"] for r in done) / elapsed,
            "goodput_requests_per_s": len(good) / elapsed,
            "ttft_ms": ms(percentiles([r["ttft"] for r in done])), "itl_ms": ms(percentiles(itl)),
            "e2e_ms": ms(percentiles([r["e2e"] for r in done]))}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["runs"] if r["ttft_ms"]]
    x = [r["request_throughput"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key in zip(axes, ("ttft_ms", "itl_ms", "e2e_ms")):
        for q in ("p50", "p90", "p99"):
            axis.plot(x, [r[key][q] for r in rows], marker="o", label=q)
        axis.set_xlabel("requests/s served")
        axis.set_ylabel(key.replace("_", " "))
        axis.legend()
    fig.suptitle(f"{report['model']}: latency against load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-name", default="tgi")
    parser.add_argument("--rates", default="1,4,16,inf")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--dataset", choices=["uniform", "sharegpt"], default="uniform")
    parser.add_argument("--prompt-len", default="100,1024")
    parser.add_argument("--output-len", default="100,1024")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--slo-ttft-ms", type=float, default=500)
    parser.add_argument("--slo-tpot-ms", type=float, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    plow, phigh = map(int, args.prompt_len.split(","))
    olow, ohigh = map(int, args.output_len.split(","))
    prompt_lens = lengths(args.num_prompts, plow, phigh, args.dataset, rng)
    prompts = [[rng.randrange(100, args.vocab) for _ in range(n)] for n in prompt_lens]
    outputs = lengths(args.num_prompts, olow, ohigh, args.dataset, rng)
    info = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    runs = [asyncio.run(run_rate(args, float(rate), prompts, outputs)) for rate in args.rates.split(",")]
    report = {"benchmark": "serving", "url": args.url, "model": info, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "prompt_len": [plow, phigh], "output_len": [olow, ohigh],
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}, "runs": runs}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); the JSON above has the figures")


if __name__ == "__main__":
    main()
