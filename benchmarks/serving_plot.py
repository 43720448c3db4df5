"""The PNG of a serving.py report: TTFT, TPOT and end-to-end latency (p50 and p99, log scale)
against the requests per second each server served, one colour per server. Measures nothing:
it reads the JSON and writes the PNG beside it (serving.json -> serving.png), printing the
PNG's path on stderr.

serving.py draws it at the end of a run when matplotlib is importable; elsewhere (the GPU
machine's image has none) draw it afterwards from the JSON, beside it:

    python benchmarks/serving_plot.py serving/serving.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

LATENCIES = ("ttft_ms", "tpot_ms", "e2e_ms")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (name, entry), color in zip(report["servers"].items(), ("C0", "C3", "C2")):
        rows = [r for r in entry.get("runs", []) if r["ttft_ms"]]
        x = [r["request_throughput"] for r in rows]
        for axis, key in zip(axes, LATENCIES):
            for q, style in (("p50", "o-"), ("p99", "^--")):
                axis.plot(x, [r[key].get(q, math.nan) for r in rows], style, color=color, label=f"{name} {q}")
    for axis, key in zip(axes, LATENCIES):
        axis.set_xlabel("requests/s served")
        axis.set_ylabel(key.replace("_", " ") + " (log)")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(report['model'].rstrip('/'))}: latency against load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(report: dict, path: str) -> None:
    try:
        plot(report, path)
        print(f"plot: {path}", file=sys.stderr)
    except ImportError:
        print("no matplotlib here, so no plot; the JSON has every figure, and "
              "`python benchmarks/serving_plot.py JSON` draws it where matplotlib is", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="a serving.py JSON report")
    args = parser.parse_args()
    with open(args.report) as f:
        save(json.load(f), os.path.splitext(args.report)[0] + ".png")


if __name__ == "__main__":
    main()
