"""Request lengths for the benchmarks that replay a workload (throughput.py, serving.py)."""
from __future__ import annotations

import math
import random

DATASETS = ("uniform", "sharegpt")


def lengths(count: int, low: int, high: int, dataset: str, rng: random.Random) -> list[int]:
    """`count` lengths in [low, high]: uniform, or ShareGPT-like (most conversations short, a
    long tail: log-normal around a quarter of the range's sum, clipped to the range)."""
    if dataset == "uniform":
        return [rng.randint(low, high) for _ in range(count)]
    mu = math.log((low + high) / 4)
    return [min(high, max(low, int(rng.lognormvariate(mu, 0.8)))) for _ in range(count)]
