"""How fast this host runs the engine's per-token Python work (no GPU needed): a plain Python
loop, decoding 8 tokens with Mistral's v3 tokenizer, and one incremental detokenizer step.
Prints one JSON line: the Python version and microseconds per call of each (the fastest of
three rounds), to compare hosts before blaming the engine for a slow step.

    python benchmarks/host_speed.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import best_seconds  # noqa: E402
from server.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from server.engine.tokenizer import Tokenizer  # noqa: E402


def per_call_us(fn, n: int) -> float:
    return best_seconds(fn, repeats=n, device="cpu") * 1e6


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    folder = tempfile.mkdtemp()
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", folder + "/tokenizer.model.v3")
    tokenizer = Tokenizer.load(folder)
    rng = random.Random(0)
    detok = IncrementalDetokenizer(tokenizer, [rng.randrange(100, 32000) for _ in range(100)])
    ids = [rng.randrange(100, 32000) for _ in range(8)]
    print(json.dumps({
        "python": sys.version.split()[0],
        "loop_1e5_us": per_call_us(lambda: sum(range(100_000)), 20),
        "decode_8_tokens_us": per_call_us(lambda: tokenizer.decode(ids), 2000),
        "detokenizer_add_us": per_call_us(lambda: detok.add(rng.randrange(100, 32000)), 2000),
    }))


if __name__ == "__main__":
    main()
