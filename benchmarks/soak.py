"""Soak: mixed traffic for a set time at the highest rate the server sustains; does anything grow?
Prints one JSON object (also to --out): the ramp's steps, the rate soaked at, requests by
outcome with latency percentiles, and RSS and KV blocks in use idle before and after, with a
no_growth verdict.

Traffic arrives as a Poisson process. Each request is one of `/generate`, `/generate_stream`,
`/v1/chat/completions` plain and streamed (equal shares), greedy or sampled; 1% are malformed
(broken JSON, a missing field, an out-of-range parameter: each must be refused with a 4xx) and
5% are cancelled (the client hangs up after 0.05-3 s, mid-stream or mid-request, and the
server must abort the work and free its KV blocks).

The rate, unless `--rate` is given, comes from a ramp: steps of `--step-seconds` from
`--ramp-start` req/s, each 1.5 times the last. A step is sustained when (1) nothing failed but
the injected malformed and cancelled requests (no 429, 5xx, stream error or timeout), (2) the
p99 latency of served requests is at most `--p99-bound-s`, and (3) the server keeps up: the
requests inside it (waiting + running, read from /metrics each second) do not pile up, i.e.
their least-squares growth over the step's second half (the first is the climb from an
empty server) is at most max(3, half their mean). The soak runs at the last sustained rate.

Growth: after the ramp (or `--warmup-seconds` at `--rate`), the server is left idle until its
batch is empty and its RSS (with its child processes) and KV blocks in use are read; then the
soak; then idle again and the same readings. No growth means the same KV blocks in use (0)
and RSS growth within `--rss-bound-mb`. One JSON object is printed.

    python benchmarks/soak.py --duration 600 --out soak.json          # starts the default model
    python benchmarks/soak.py --url http://127.0.0.1:8080 --pid 1234 --rate 2 --duration 600
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import servers  # noqa: E402
from benchmarks.serving import percentiles  # noqa: E402

ROUTES = [("/generate", False), ("/generate_stream", True),
          ("/v1/chat/completions", False), ("/v1/chat/completions", True)]
WORDS = ("river mountain engine quantum garden violin harbor desert comet library lantern glacier "
         "orchard compass tide meadow furnace atlas").split()
MALFORMED = [  # (route, raw body): each must be refused with a 4xx
    ("/generate", b'{"inputs": "unterminated'),
    ("/generate", b'{"parameters": {"max_new_tokens": 5}}'),
    ("/generate", b'{"inputs": "hi", "parameters": {"temperature": -1}}'),
    ("/generate_stream", b'{"inputs": "hi", "parameters": {"max_new_tokens": 1000000000}}'),
    ("/v1/chat/completions", b'{"messages": "not a list"}'),
]


def request_plan(rng: random.Random, args) -> dict:
    """The next request: its category (normal, malformed, cancelled), route and body."""
    draw = rng.random()
    if draw < args.malformed:
        route, raw = rng.choice(MALFORMED)
        return {"category": "malformed", "route": route, "stream": False, "content": raw, "cancel_after": None}
    route, stream = rng.choice(ROUTES)
    prompt = f"Write a short note about the {' and the '.join(rng.sample(WORDS, rng.randint(1, 12)))}."
    max_tokens = rng.randint(args.min_new_tokens, args.max_new_tokens)
    sampled = rng.random() < 0.5
    if route.startswith("/v1"):
        body = {"model": "tgi", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "stream": stream, "temperature": 0.8 if sampled else 0}
    else:
        sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31)} \
            if sampled else {}
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, **sampling}}
    cancelled = draw < args.malformed + args.cancelled
    return {"category": "cancelled" if cancelled else "normal", "route": route, "stream": stream,
            "content": json.dumps(body).encode(), "cancel_after": rng.uniform(0.05, 3.0) if cancelled else None}


async def send(client: httpx.AsyncClient, plan: dict) -> int | str:
    """The HTTP status, or "stream_error" when a streamed answer carries an error event."""
    headers = {"Content-Type": "application/json"}
    if not plan["stream"]:
        response = await client.post(plan["route"], content=plan["content"], headers=headers)
        return response.status_code
    async with client.stream("POST", plan["route"], content=plan["content"], headers=headers) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if data.startswith("{") and "error" in json.loads(data):
                status = "stream_error"
    return status


async def one_request(client: httpx.AsyncClient, plan: dict) -> dict:
    start = time.perf_counter()
    try:
        status = await asyncio.wait_for(send(client, plan), timeout=plan["cancel_after"])
    except asyncio.TimeoutError:
        status = "cancelled"
    except httpx.HTTPError as error:
        status = type(error).__name__
    return {"category": plan["category"], "status": status, "latency": time.perf_counter() - start}


def unexpected(result: dict) -> bool:
    """A failure that the traffic did not ask for."""
    status = result["status"]
    if result["category"] == "malformed":
        return not (isinstance(status, int) and 400 <= status < 500)
    return status not in (200, "cancelled")


async def drive(client: httpx.AsyncClient, rng: random.Random, args, rate: float, seconds: float) -> list[dict]:
    """Poisson arrivals at `rate` for `seconds`; returns when every request has ended."""
    tasks, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        tasks.append(asyncio.create_task(one_request(client, request_plan(rng, args))))
        await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """Every series of /metrics, by its name with labels (`tgi_request_failure{err="dropped"}`)."""
    series = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


async def monitor(client: httpx.AsyncClient, pid: int | None, samples: list[dict]) -> None:
    """Each second: requests inside the server, KV blocks in use and RSS."""
    while True:
        m = await metrics(client)
        samples.append({"t": time.monotonic(), "in_server": m["tgi_queue_size"] + m["tgi_batch_current_size"],
                        "kv_blocks_in_use": m["tgi_kv_cache_blocks_in_use"], "rss_mb": rss_mb(pid)})
        await asyncio.sleep(1)


async def idle_reading(client: httpx.AsyncClient, pid: int | None, timeout: float = 120) -> dict:
    """KV blocks and RSS once the server has nothing left to run (and what it has counted)."""
    deadline = time.monotonic() + timeout
    while (m := await metrics(client))["tgi_batch_current_size"] + m["tgi_queue_size"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(2)  # let aborted requests' last steps and the allocator settle
    m = await metrics(client)
    return {"kv_blocks_in_use": m["tgi_kv_cache_blocks_in_use"], "kv_blocks_total": m["tgi_kv_cache_blocks_total"],
            "rss_mb": rss_mb(pid), "metrics": m}


def growth(samples: list[dict]) -> float:
    """Least-squares change of the requests inside the server over the samples' span."""
    if len(samples) < 3:
        return 0.0
    t = [s["t"] for s in samples]
    slope = statistics.linear_regression(t, [s["in_server"] for s in samples]).slope
    return slope * (t[-1] - t[0])


def summary(results: list[dict]) -> dict:
    served = [r for r in results if r["category"] == "normal" and r["status"] == 200]
    statuses: dict[str, Counter] = {}
    for r in results:
        statuses.setdefault(r["category"], Counter())[str(r["status"])] += 1
    errors = sum((Counter({s: n for s, n in c.items() if s != "200"}) for c in statuses.values()), Counter())
    return {"sent": len(results), "served": len(served), "status_by_category": statuses,
            "errors_by_status": errors, "unexpected_errors": sum(unexpected(r) for r in results),
            "latency_s": percentiles([r["latency"] for r in served])}


async def find_rate(client, rng, args, samples) -> tuple[float | None, list[dict]]:
    rate, sustained, steps = args.ramp_start, None, []
    for _ in range(args.ramp_steps):
        start = time.monotonic()
        results = await drive(client, rng, args, rate, args.step_seconds)
        window = [s for s in samples if start + args.step_seconds / 2 <= s["t"] <= start + args.step_seconds]
        step = {"rate": rate, **summary(results), "in_server_growth": growth(window),
                "in_server_mean": statistics.fmean(s["in_server"] for s in window) if window else 0.0}
        step["sustained"] = (step["unexpected_errors"] == 0 and bool(step["latency_s"])
                             and step["latency_s"]["p99"] <= args.p99_bound_s
                             and step["in_server_growth"] <= max(3.0, step["in_server_mean"] / 2))
        steps.append(step)
        if not step["sustained"]:
            break
        sustained, rate = rate, round(rate * 1.5, 3)
    return sustained, steps


def start_server(args) -> servers.Server:
    port = servers.free_port()
    model = ["--model-id", args.model_id] if args.model_id else []
    command = [sys.executable, "-m", "server", "--hostname", "127.0.0.1", "--port", str(port), *model,
               *shlex.split(args.server_args)]
    return servers.start("server", command, f"http://127.0.0.1:{port}", args.server_log, timeout_s=600)


async def soak(args, url: str, pid: int | None) -> dict:
    rng = random.Random(args.seed)
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        ready = await idle_reading(client, pid)
        sampler = asyncio.create_task(monitor(client, pid, samples))
        if args.rate:
            rate, ramp = args.rate, []
            await drive(client, rng, args, rate, args.warmup_seconds)
        else:
            rate, ramp = await find_rate(client, rng, args, samples)
            if rate is None:
                raise SystemExit(f"not even {args.ramp_start} req/s is sustained: {json.dumps(ramp)}")
        start = await idle_reading(client, pid)
        began = time.monotonic()
        results = await drive(client, rng, args, rate, args.duration)
        elapsed = time.monotonic() - began
        end = await idle_reading(client, pid)
        sampler.cancel()
        model = (await client.get("/info")).json()["model_id"]
    during = [s for s in samples if began <= s["t"] <= began + args.duration]
    counted = {k: end["metrics"].get(k, 0) - start["metrics"].get(k, 0) for k in end["metrics"]
               if k.startswith(("tgi_request_success", "tgi_request_failure", "tgi_request_count"))}
    rss_growth = end["rss_mb"] - start["rss_mb"] if pid else None
    requests = summary(results)
    return {
        "benchmark": "soak", "model": model, "url": url, "rate_req_s": rate, "duration_s": elapsed,
        "requests": requests, "served_per_s": requests["served"] / elapsed,
        "server_counted": counted,
        "kv_blocks_in_use": {"start": start["kv_blocks_in_use"], "end": end["kv_blocks_in_use"],
                             "total": end["kv_blocks_total"], "max_during": max((s["kv_blocks_in_use"] for s in during), default=0)},
        "rss_mb": {"ready": ready["rss_mb"], "start": start["rss_mb"], "end": end["rss_mb"], "growth": rss_growth,
                   "bound": args.rss_bound_mb},
        "no_growth": end["kv_blocks_in_use"] == start["kv_blocks_in_use"]
        and (rss_growth is None or rss_growth <= args.rss_bound_mb),
        "samples_every_60s": [{"t_s": round(s["t"] - began), "in_server": s["in_server"],
                               "kv_blocks_in_use": s["kv_blocks_in_use"], "rss_mb": s["rss_mb"]}
                              for s in during[::60]],
        "ramp": ramp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server; without it one is started")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to read its RSS")
    parser.add_argument("--model-id", help="for the started server (default: its embedded default model)")
    parser.add_argument("--server-args", default="", help="more flags for the started server, one string")
    parser.add_argument("--server-log", default=os.path.join(tempfile.gettempdir(), "soak-server.log"))
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--rate", type=float, help="requests/s; without it a ramp finds the highest sustained")
    parser.add_argument("--warmup-seconds", type=float, default=60, help="with --rate: traffic before the start")
    parser.add_argument("--ramp-start", type=float, default=0.5)
    parser.add_argument("--ramp-steps", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=60)
    parser.add_argument("--p99-bound-s", type=float, default=15)
    parser.add_argument("--rss-bound-mb", type=float, default=32)
    parser.add_argument("--malformed", type=float, default=0.01)
    parser.add_argument("--cancelled", type=float, default=0.05)
    parser.add_argument("--min-new-tokens", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    server = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        server = start_server(args)
        url, pid = server.url, server.process.pid
    try:
        report = asyncio.run(soak(args, url, pid))
    finally:
        if server is not None:
            server.stop(grace_s=120)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
