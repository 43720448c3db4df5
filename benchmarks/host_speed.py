"""How fast this host runs the engine's per-token Python work (no GPU needed)."""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from server.engine.tokenizer import Tokenizer  # noqa: E402


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
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
