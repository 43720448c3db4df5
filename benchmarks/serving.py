"""Online serving: Poisson arrivals at several request rates, against one server or two side by side.
Prints JSON, also written to --out as serving.json: per server and rate, TTFT, TPOT, ITL and
end-to-end latency percentiles, request and token throughput and goodput, and with two servers
their ratios; serving.png beside it where matplotlib is.

Streams every request to `/v1/completions` and reports, per rate, time to first token (TTFT),
time per output token after the first (TPOT), inter-token latency (ITL, between streamed chunks)
and end-to-end latency (mean, p50, p90, p99), request and output-token throughput, and goodput
(requests per second that met the SLO on TTFT and TPOT). Prompts are text made of common words,
each one token for Mistral's tokenizers, so an n-word prompt is n + 1 tokens (with BOS) for
every server; outputs are bounded by `max_tokens` at temperature 0. Lengths come from a fixed
seeded distribution: uniform in the given ranges, or ShareGPT-like (log-normal). A request's
`model` is the model directory for a started server (`transformers serve` loads what it names;
ours takes any name), else `--model-name` or the first model the server lists.

Either start ours and Hugging Face's `transformers serve` on one model directory (servers.py),
one after the other under the same load, for one JSON with both and their ratios (the first
named over the second: above 1 is better for throughputs, below 1 for latencies), or drive any
running OpenAI-compatible server:

    python benchmarks/serving.py --launch ours,transformers --model /tmp/mistral-7b --out serving/
    python benchmarks/serving.py --url http://127.0.0.1:8080 --rates 1,4,16,inf --out serving/

serving/ then holds serving.json, the servers' logs, and serving.png where matplotlib is
(serving_plot.py draws it later from the JSON otherwise). `--ours-args` passes flags through,
e.g. to compare the engine in its own process (`--engine-process true`, the default on a GPU)
with the engine in a thread of the HTTP server's process, one run each:

    python benchmarks/serving.py --launch ours --model /tmp/mistral-7b --rates inf --out thread/ \
        --ours-args "--engine-process false"

Time is bounded: `--time-budget` seconds for everything, starting the servers included, is
shared by the servers still to run, and a server's share by its rates still to run. Rates run
from the highest down, so what the fast ones leave goes to the low rates, whose arrivals alone
take num_prompts / rate seconds. A rate's requests still running at its end are cut off and
counted as such (the tokens they streamed count towards its output-token throughput).
For a started server each rate also reports `cpu_us_per_token`: the CPU time its own process
("server") and the rest of its process group ("children": the engine's process) spent per
streamed token, which says whether the HTTP side or the engine's host work runs out of core
first (a process near 1e6 / tokens-per-second is saturated); every rate reports
`client_cpu_cores`, the CPU the client's processes spent over the run in cores (near
`--client-processes`: the client is the bottleneck; give it more processes).
With `--find-rate`, the rates are not given but searched for: the highest Poisson rate at which
the server keeps TPOT p50 under --slo-tpot-p50-ms and TTFT p99 under --slo-ttft-p99-ms (25 ms
and 1 s by default), doubling from the first of --rates until a rate misses, then halving the
interval, --search-probes runs in all; `find_rate` in the report has each probe and the
output tokens/s at the rate found (what the server keeps of the engine's offline figure):

    python benchmarks/serving.py --launch ours --model /tmp/mistral-7b --find-rate --rates 8 \
        --num-prompts 400 --prompt-len 100,1024 --output-len 100,1024 --time-budget 540 --out rate/

With `--py-spy SECONDS` (py-spy on the PATH), a started server's processes are sampled for
that long from the start of each rate, and the rate reports where their samples fell
(`profile`: the busiest frames of each process, by self and by inclusive samples), beside
the raw stacks in --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import servers, serving_plot  # noqa: E402
from benchmarks.workload import DATASETS, lengths  # noqa: E402
from benchmarks.serving_plot import LATENCIES  # noqa: E402

WORDS = ("the of and to in is was for that with as on by at from his her they this which are but not have "
         "had one all were when there can their been more time people about would year into only new some "
         "could two first other then after most many also like over state city world water house school "
         "river garden light story night family market").split()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def workload(args) -> tuple[list[str], list[int]]:
    rng = random.Random(args.seed)
    plow, phigh = map(int, args.prompt_len.split(","))
    olow, ohigh = map(int, args.output_len.split(","))
    prompts = [" ".join(rng.choice(WORDS) for _ in range(n))
               for n in lengths(args.num_prompts, plow, phigh, args.dataset, rng)]
    return prompts, lengths(args.num_prompts, olow, ohigh, args.dataset, rng)


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, record: dict) -> None:
    """Streams one completion into `record` as its chunks arrive, so that a request cut off by
    cancellation leaves what it got: start, arrival times, usage, and `status` ("ok" at the end)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    record.update(start=time.perf_counter(), arrivals=[], usage=None, status="cut off")
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record["status"] = response.status_code
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    record["status"] = "stream error"
                    return
                if chunk.get("usage"):
                    record["usage"] = chunk["usage"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    record["arrivals"].append(time.perf_counter())
    except Exception as e:  # the client's own failure (a broken connection, an event it could not parse)
        record["status"] = type(e).__name__
        return
    record["end"] = time.perf_counter()
    record["status"] = "ok" if record["arrivals"] else "empty"


def output_tokens(record: dict) -> int:
    return (record["usage"] or {}).get("completion_tokens") or len(record["arrivals"])


def summary(records: list[dict], elapsed: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    done = [r for r in records if r["status"] == "ok"]
    ttft = {id(r): r["arrivals"][0] - r["start"] for r in done}
    tpot = {id(r): (r["arrivals"][-1] - r["arrivals"][0]) / (output_tokens(r) - 1)
            for r in done if output_tokens(r) > 1}
    good = [r for r in done if ttft[id(r)] * 1000 <= slo_ttft_ms and tpot.get(id(r), 0) * 1000 <= slo_tpot_ms]
    cut_off = [r for r in records if r["status"] == "cut off"]
    streamed = sum(output_tokens(r) for r in done) + sum(len(r["arrivals"]) for r in cut_off)
    prompt_tokens = [r["usage"]["prompt_tokens"] for r in done if r["usage"]]
    ms = lambda values: {k: v * 1000 for k, v in percentiles(list(values)).items()}  # noqa: E731
    return {"duration_s": elapsed, "completed": len(done),
            "outcomes": dict(Counter(str(r["status"]) for r in records)),
            "mean_prompt_tokens": statistics.fmean(prompt_tokens) if prompt_tokens else None,
            "mean_output_tokens": statistics.fmean(output_tokens(r) for r in done) if done else None,
            "request_throughput": len(done) / elapsed, "output_token_throughput": streamed / elapsed,
            "goodput_requests_per_s": len(good) / elapsed,
            "ttft_ms": ms(ttft.values()), "tpot_ms": ms(tpot.values()),
            "itl_ms": ms(b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:])),
            "e2e_ms": ms(r["end"] - r["start"] for r in done)}


def run_rate(url: str, model: str, rate: float, prompts, outputs, deadline: float, args) -> dict:
    """Requests arrive until all are sent or `deadline` (a perf_counter time) passes; those
    still running then are cancelled. With --client-processes N, N processes each send every
    N-th request at rate / N (Poisson arrivals split N ways are Poisson at rate / N), so that
    one client process's parsing of the streams does not set the pace."""
    n = max(1, min(args.client_processes, len(prompts)))
    shares = [(url, model, rate / n, prompts[i::n], outputs[i::n], deadline, args.seed + i, args.request_timeout)
              for i in range(n)]
    if n == 1:
        results = [send_share(*shares[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(n) as pool:  # fresh interpreters, no forked loop
            results = pool.starmap(send_share, shares)
    records = [record for share_records, *_ in results for record in share_records]
    start, end = min(r[1] for r in results), max(r[2] for r in results)
    elapsed = end - start
    result = {"request_rate": rate if math.isfinite(rate) else "inf", "sent": len(records),
              "not_sent": len(prompts) - len(records),
              **summary(records, elapsed, args.slo_ttft_ms, args.slo_tpot_ms)}
    # The client processes' CPU over the run, in cores: near their number, the clients set the
    # pace, not the server.
    result["client_processes"] = n
    result["client_cpu_cores"] = sum(r[3] for r in results) / elapsed if elapsed else None
    return result


def send_share(url: str, model: str, rate: float, prompts, outputs, deadline: float, seed: int,
               request_timeout: float) -> tuple[list[dict], float, float, float]:
    """One client process's requests: their records, its start and end (perf_counter, one clock
    for every process of the machine) and the CPU seconds it spent."""
    return asyncio.run(_send_share(url, model, rate, prompts, outputs, deadline, seed, request_timeout))


async def _send_share(url, model, rate, prompts, outputs, deadline, seed, request_timeout):
    rng = random.Random(seed)
    records: list[dict] = []
    tasks = []
    limits = httpx.Limits(max_connections=len(prompts) + 10)
    timeout = httpx.Timeout(request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start, cpu_start = time.perf_counter(), time.process_time()
        for prompt, max_tokens in zip(prompts, outputs):
            if time.perf_counter() >= deadline:
                break
            records.append({})
            tasks.append(asyncio.create_task(one_request(client, model, prompt, max_tokens, records[-1])))
            if math.isfinite(rate):
                await asyncio.sleep(min(rng.expovariate(rate), max(0.0, deadline - time.perf_counter())))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter())) if tasks else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
    return records, start, end, time.process_time() - cpu_start


async def warm_up(url: str, model: str, deadline: float) -> None:
    """One request, then three at once: `transformers serve` loads the model on its first, and
    both servers have their batching machinery (CUDA graphs, the batching manager) ready before
    anything is timed."""
    rng = random.Random(-1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(128)) for _ in range(4)]
    records: list[dict] = [{} for _ in prompts]

    async def requests() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            await one_request(client, model, prompts[0], 16, records[0])
            await asyncio.gather(*(one_request(client, model, p, 16, r) for p, r in zip(prompts[1:], records[1:])))

    try:
        await asyncio.wait_for(requests(), max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        raise RuntimeError("the warm-up requests were not answered within the time left") from None
    failed = [r["status"] for r in records if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed}")


def bench(name: str, args, prompts, outputs, deadline: float, entry: dict) -> None:
    """One server's runs into `entry`, every rate within `deadline`; a server that fails to start
    or to answer gets an `error` (and the end of its log) there instead, and the others still run."""
    server = None
    try:
        if args.url:
            url = args.url
            model = args.model_name or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        else:
            port, model = servers.free_port(), args.model
            url = f"http://127.0.0.1:{port}"
            extra = shlex.split(getattr(args, f"{name}_args"))
            if name == "ours":  # every request of an infinite rate in flight at once, as the peer allows
                extra = ["--max-concurrent-requests", str(max(128, args.num_prompts + 8)), *extra]
            command = servers.COMMANDS[name](model, port, args.dtype, extra)
            entry.update(command=shlex.join(command), log=os.path.join(args.out, f"{name}.log"))
            began = time.perf_counter()
            server = servers.start(name, command, url, entry["log"], timeout_s=deadline - began)
            asyncio.run(warm_up(url, model, deadline))
            entry["ready_s"] = time.perf_counter() - began  # start, model load and warm-up
        entry.update(url=url, model=model, runs=[])

        def measure(rate: float, share: float) -> dict:
            cpu_before = server.cpu_seconds() if server else {}
            profiler = start_profile(server.process.pid, args.py_spy, os.path.join(
                args.out, f"{name}-{rate:g}.pyspy")) if server and args.py_spy else None
            run = run_rate(url, model, rate, prompts, outputs, time.perf_counter() + share, args)
            if cpu_before:
                run["cpu_us_per_token"] = cpu_per_token(cpu_before, server.cpu_seconds(), run)
            if profiler:
                run["profile"] = finish_profile(*profiler)
            entry["runs"].append(run)
            print(f"{name} at {run['request_rate']} req/s: {run['completed']} of {len(prompts)} served, "
                  f"{run['output_token_throughput']:.0f} tokens/s", file=sys.stderr)
            time.sleep(2)  # whatever a cut-off left running drains before the next rate
            return run

        if args.find_rate:
            entry["find_rate"] = find_rate(measure, deadline, args)
        else:
            rates = sorted((float(r) for r in args.rates.split(",")), reverse=True)
            for i, rate in enumerate(rates):
                measure(rate, (deadline - time.perf_counter()) / (len(rates) - i))
        entry["runs"].sort(key=lambda run: float(run["request_rate"]))
    except Exception as e:  # a failed server is reported; the run goes on to the next
        entry["error"] = f"{type(e).__name__}: {e}"
        print(f"{name}: {entry['error']}", file=sys.stderr)
        if server:
            entry["log_tail"] = server.log_tail()
    finally:
        if server:
            server.stop()


def meets_slo(run: dict, args) -> bool:
    """Every request sent and served, TPOT p50 and TTFT p99 within --slo-tpot-p50-ms and
    --slo-ttft-p99-ms (a rate cut off by its time is not known to meet it, so it does not)."""
    return (not run["not_sent"] and run["outcomes"] == {"ok": run["sent"]}
            and run["tpot_ms"].get("p50", math.inf) <= args.slo_tpot_p50_ms
            and run["ttft_ms"].get("p99", math.inf) <= args.slo_ttft_p99_ms)


def search_rates(meets, start: float, probes: int) -> float | None:
    """The highest request rate found to meet the SLO in `probes` probes (`meets(rate)`): the
    rate doubles from `start` until one fails (halves until one meets it, if the first fails),
    then the interval between the best that met it and the lowest that failed is halved."""
    best = worst = None  # the highest rate that met the SLO, the lowest that did not
    rate = start
    for _ in range(probes):
        if meets(rate):
            best = rate
        else:
            worst = rate
        rate = rate * 2 if worst is None else rate / 2 if best is None else (best + worst) / 2
    return best


def find_rate(measure, deadline: float, args) -> dict:
    """--find-rate: the highest Poisson rate at which the server keeps TPOT p50 and TTFT p99
    within the SLO (search_rates, --search-probes probes sharing the time left), and the output
    tokens/s it served there."""
    probes: list[dict] = []

    def meets(rate: float) -> bool:
        share = (deadline - time.perf_counter()) / (args.search_probes - len(probes))
        run = measure(rate, share)
        probes.append({"request_rate": rate, "meets_slo": meets_slo(run, args),
                       "tpot_ms_p50": run["tpot_ms"].get("p50"), "ttft_ms_p99": run["ttft_ms"].get("p99"),
                       "output_token_throughput": run["output_token_throughput"]})
        return probes[-1]["meets_slo"]

    best = search_rates(meets, float(args.rates.split(",")[0]), args.search_probes)
    at_best = next((p for p in probes if p["request_rate"] == best), {})
    return {"slo": {"tpot_ms_p50": args.slo_tpot_p50_ms, "ttft_ms_p99": args.slo_ttft_p99_ms},
            "max_request_rate": best, "output_token_throughput": at_best.get("output_token_throughput"),
            "probes": probes}


def start_profile(pid: int, seconds: float, path: str) -> tuple[subprocess.Popen, str, float]:
    """py-spy sampling a server's process and its children for `seconds`, raw stacks to `path`."""
    command = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--duration", str(round(seconds)),
               "--rate", "100", "--format", "raw", "--output", path, "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path, seconds


def finish_profile(process: subprocess.Popen, path: str, seconds: float) -> dict:
    try:
        process.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        process.kill()
    if not os.path.exists(path):
        return {"error": f"py-spy wrote nothing (exit status {process.returncode})"}
    with open(path) as f:
        return {"file": path, "processes": profile_summary(f)}


def profile_summary(lines, top: int = 15) -> dict:
    """py-spy's raw stacks (`frame;frame;... count` lines; with --subprocesses the first frames
    name the process and its parents) -> per process: its samples, and the frames with the most samples of
    their own and, of our code (server/), the most samples under them, each with its share."""
    processes: dict[str, dict[str, Counter]] = {}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        process = "all"
        while frames and frames[0].startswith("process "):  # a child's stacks start with its parents' names
            process = frames.pop(0).split(":", 1)[0]
        if not frames:  # a sample of a process with no Python frame (in native code)
            frames = ["(no Python frame)"]
        tallies = processes.setdefault(process, {"self": Counter(), "under": Counter()})
        tallies["self"][frames[-1]] += int(count)
        for frame in set(frames):
            if "server/" in frame:
                tallies["under"][frame] += int(count)
    summary = {}
    for process, tallies in processes.items():
        samples = sum(tallies["self"].values())
        summary[process] = {"samples": samples, **{
            kind: [[frame, round(n / samples, 4)] for frame, n in counter.most_common(top)]
            for kind, counter in (("self", tallies["self"]), ("under", tallies["under"]))}}
    return summary


def cpu_per_token(before: dict[str, float], after: dict[str, float], run: dict) -> dict[str, float | None]:
    """Microseconds of CPU each of a started server's processes spent per streamed output token
    during one rate: where the host's time goes, whatever else shares the machine's cores."""
    tokens = run["output_token_throughput"] * run["duration_s"]
    return {name: (after.get(name, 0.0) - spent) * 1e6 / tokens if tokens else None
            for name, spent in before.items()}


def ratios(first: dict, second: dict) -> list[dict]:
    """Per rate both served: the first server's figures over the second's."""
    theirs = {run["request_rate"]: run for run in second.get("runs", [])}
    rows = []
    for run in first.get("runs", []):
        other = theirs.get(run["request_rate"])
        if not other:
            continue
        row = {"request_rate": run["request_rate"]}
        for key in ("request_throughput", "output_token_throughput", "goodput_requests_per_s"):
            row[key] = run[key] / other[key] if other[key] else None
        for key in LATENCIES:
            for q in ("p50", "p99"):
                a, b = run[key].get(q), other[key].get(q)
                row[f"{key}_{q}"] = a / b if a is not None and b else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running OpenAI-compatible server")
    target.add_argument("--launch", help="servers to start one after the other: ours, transformers, or both")
    parser.add_argument("--model", help="with --launch: the model directory both servers load")
    parser.add_argument("--model-name", help="with --url: the request's `model` (default: the server's first)")
    parser.add_argument("--dtype", default="bfloat16", help="with --launch: both servers' dtype")
    parser.add_argument("--ours-args", default="", help="more flags for `python -m server`, one string")
    parser.add_argument("--transformers-args", default="", help="more flags for `transformers serve`, one string")
    parser.add_argument("--rates", default="1,4,16,inf")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--dataset", choices=DATASETS, default="uniform")
    parser.add_argument("--prompt-len", default="100,1024", help="words (tokens), low,high")
    parser.add_argument("--output-len", default="64,256", help="max_tokens, low,high")
    parser.add_argument("--slo-ttft-ms", type=float, default=500)
    parser.add_argument("--slo-tpot-ms", type=float, default=50)
    parser.add_argument("--time-budget", type=float, default=420, help="seconds for the whole run, starts included")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds a request may wait for a chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes sending the requests, each every N-th at rate / N (one Python client "
                             "parses a few thousand streamed tokens a second)")
    parser.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                        help="sample a started server's processes with py-spy this long in each rate (0: no)")
    parser.add_argument("--find-rate", action="store_true",
                        help="search for the highest rate that meets --slo-tpot-p50-ms and --slo-ttft-p99-ms, "
                             "from the first of --rates, in --search-probes runs")
    parser.add_argument("--slo-tpot-p50-ms", type=float, default=25)
    parser.add_argument("--slo-ttft-p99-ms", type=float, default=1000)
    parser.add_argument("--search-probes", type=int, default=6)
    parser.add_argument("--out", default="serving", help="directory for serving.json, the PNG and the servers' logs")
    args = parser.parse_args()
    if args.launch and not args.model:
        parser.error("--launch needs --model")
    if args.find_rate and not math.isfinite(float(args.rates.split(",")[0])):
        parser.error("--find-rate starts from the first of --rates, which must be a finite rate")
    names = args.launch.split(",") if args.launch else ["server"]
    if unknown := [n for n in names if args.launch and n not in servers.COMMANDS]:
        parser.error(f"--launch knows {', '.join(servers.COMMANDS)}, not {', '.join(unknown)}")
    os.makedirs(args.out, exist_ok=True)
    # A SIGTERM (a `timeout` around the run) unwinds like an exception, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prompts, outputs = workload(args)
    end = time.perf_counter() + args.time_budget
    report = {"benchmark": "serving", "model": args.model or args.url, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
              "time_budget_s": args.time_budget, "servers": {}}
    try:
        for i, name in enumerate(names):  # each server gets an equal share of the time the others left
            share = (end - time.perf_counter()) / (len(names) - i)
            bench(name, args, prompts, outputs, time.perf_counter() + share, report["servers"].setdefault(name, {}))
        if len(names) == 2:
            report["ratios"] = {"of": f"{names[0]} / {names[1]}",
                                "runs": ratios(*(report["servers"][n] for n in names))}
    finally:  # what was measured is kept even when the run is cut short
        with open(os.path.join(args.out, "serving.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    serving_plot.save(report, os.path.join(args.out, "serving.png"))


if __name__ == "__main__":
    main()
