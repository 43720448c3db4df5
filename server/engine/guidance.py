"""Constrained decoding with llguidance: a request's grammar, a matcher per sequence, and each
step's masks of the tokens the matchers allow.

A grammar is compiled and checked where the request enters. Each sequence then carries a
matcher that advances with every token it accepts. Once a step's forward pass is queued (and
the tokens it follows accepted), the masks of its guided rows are filled on the host while the
device computes the logits, and applied there before sampling. Unguided rows, and batches
without a guided row, pay nothing. A grammar always allows an end-of-sequence token once it is
complete (or cannot go on), so a masked row is never left without a token to pick.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict

import llguidance
import torch

from server.engine.tokenizer import Tokenizer
from server.runtime.sampler import AllowedTokens
from server.sampling_params import SamplingParams

# How JSON is written under a schema: on one line with json.dumps's separators, so that a model
# can neither pad it with whitespace forever nor format it two ways. oneOf is read as anyOf.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
               "coerce_one_of": True}


# What one request's grammar may cost. A schema's text and a regex are bounded in characters and
# a schema in nesting (it is walked recursively, here and in llguidance); compiled grammars are
# kept for reuse up to a count and a total size, least recently used dropped first.
MAX_GRAMMAR_CHARS = 65_536
MAX_SCHEMA_DEPTH = 64
CACHE_ENTRIES = 256
CACHE_CHARS = 16 * 2**20


class Guidance:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int], on_gpu: bool):
        # The model's vocabulary may be padded past the tokenizer's: those ids spell nothing.
        tokens = (tokenizer.token_bytes() + [None] * vocab_size)[:vocab_size]
        vocabulary = Vocabulary(tokens, min(eos_token_ids))
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary),
                                                eos_token=sorted(eos_token_ids))
        self.words = (vocab_size + 31) // 32
        self.pin_memory = on_gpu  # so that the masks' copy to the GPU does not wait
        self.executor = llguidance.LLExecutor()
        self._compiled: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._compiled_chars = 0

    def grammar(self, params: SamplingParams) -> str | None:
        """The request's grammar, checked; None when it has none. A schema or regex that
        cannot be enforced, or is past the limits above, raises ValueError saying why."""
        if params.guided_json is not None:
            depth = _nesting(params.guided_json)
            if depth > MAX_SCHEMA_DEPTH:
                raise ValueError(f"grammar is not valid: the schema nests more than {MAX_SCHEMA_DEPTH} "
                                 f"levels of objects and arrays")
            return self._compile("json", _bounded(json.dumps(params.guided_json), "schema"))
        if params.guided_regex is not None:
            return self._compile("regex", _bounded(params.guided_regex, "regex"))
        return None

    def _compile(self, kind: str, source: str) -> str:
        key = (kind, source)
        grammar = self._compiled.get(key)
        if grammar is not None:
            self._compiled.move_to_end(key)
            return grammar
        if kind == "json":
            grammar = self._compile_uncached(kind, json.dumps(_declared_properties_only(json.loads(source))))
        else:
            grammar = self._compile_uncached(kind, ascii_classes(source))
        self._compiled[key] = grammar
        self._compiled_chars += len(source) + len(grammar)
        while len(self._compiled) > CACHE_ENTRIES or self._compiled_chars > CACHE_CHARS:
            (_, old_source), old = self._compiled.popitem(last=False)
            self._compiled_chars -= len(old_source) + len(old)
        return grammar

    def _compile_uncached(self, kind: str, source: str) -> str:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=JSON_FORMAT)
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"grammar is not valid: {_first_reason(error)}")
        return grammar

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    def allowed_tokens(self, rows: list[int], matchers: list[llguidance.LLMatcher]) -> AllowedTokens:
        """The masks of the matchers' next tokens, for the sampled rows `rows`."""
        bitmask = torch.empty(len(matchers), self.words, dtype=torch.int32, pin_memory=self.pin_memory)
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that module:
        # it compiles a function with torch.compile at import, which costs start-up 1.5-2 s.
        self.executor.unsafe_compute_mask_ptr([(matcher, i) for i, matcher in enumerate(matchers)],
                                              bitmask.data_ptr(), self.words * 4, len(matchers))
        return AllowedTokens(rows, bitmask)


class Vocabulary:
    """What llguidance reads of a tokenizer: each token's bytes (a leading 0xff byte marks
    one that no text spells), and a tokenization of bytes (greedy: longest token first)."""

    def __init__(self, tokens: list[bytes | None], eos_token_id: int):
        self.tokens = [t if t is not None else b"\xff<special_%d>" % i for i, t in enumerate(tokens)]
        self.special_token_ids = [i for i, t in enumerate(tokens) if t is None]
        self.eos_token_id, self.bos_token_id = eos_token_id, None
        self._ids = {t: i for i, t in enumerate(tokens) if t}
        self._longest = max(map(len, self._ids))

    def __call__(self, text: bytes) -> list[int]:
        out = []
        while text:
            size = next(n for n in range(min(self._longest, len(text)), 0, -1) if text[:n] in self._ids)
            out.append(self._ids[text[:size]])
            text = text[size:]
        return out


def _bounded(source: str, what: str) -> str:
    if len(source) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"grammar is not valid: the {what} has {len(source)} characters; "
                         f"at most {MAX_GRAMMAR_CHARS} are allowed")
    return source


def _nesting(value) -> int:
    """How deeply JSON containers nest in `value`, without recursion (a schema past Python's
    recursion limit must be refused, not crash the walk that would read it)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_SCHEMA_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _declared_properties_only(schema):
    """The schema as TGI (outlines) reads it: an object that lists `properties` has those
    alone unless it says otherwise (JSON Schema itself would allow any other key)."""
    if isinstance(schema, list):
        return [_declared_properties_only(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in _VALUES else _declared_properties_only(value) for key, value in schema.items()}
    if isinstance(out.get("pattern"), str):
        out["pattern"] = ascii_classes(out["pattern"])
    if isinstance(out.get("properties"), dict) and not {"additionalProperties", "patternProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


_VALUES = {"const", "enum", "default", "examples"}  # JSON values inside a schema, not schemas

# `\d` and `\w` as JSON Schema (ECMA-262) and TGI's outlines read them, ASCII only; llguidance
# would also take other scripts' digits and letters (a Thai zero for `\d`).
_ASCII_CLASSES = {"d": "0-9", "w": "A-Za-z0-9_"}


def ascii_classes(regex: str) -> str:
    r"""The regex with `\d` and `\w` (inside a bracket class too) spelled as ASCII ranges."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        char = regex[i]
        if char == "\\" and i + 1 < len(regex):
            escaped = regex[i + 1]
            if escaped in _ASCII_CLASSES:
                ranges = _ASCII_CLASSES[escaped]
                out.append(ranges if in_class else f"[{ranges}]")
            else:
                out.append(regex[i:i + 2])
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
            out.append(char)
            i += 1
            for literal in ("^", "]"):  # `[^` and a `]` that opens the class are not its end
                if regex.startswith(literal, i):
                    out.append(literal)
                    i += 1
            continue
        if char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def _first_reason(error: str) -> str:
    """llguidance's message on one line: for a regex, its reason without the grammar
    position or the echo of the regex that follow it."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0]).rstrip(":")
    reason = next((line for line in lines if line.startswith("error: ")), None)
    return f"{first} ({reason[len('error: '):]})" if reason else first
