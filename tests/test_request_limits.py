"""One table of limits (server/api/limits.py) for the validators and the published schema, and
the requests that once hurt others: each is refused alone, or answered as it should be."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.api.limits import LIMITS, U32, U64
from server.engine.guidance import CACHE_ENTRIES, MAX_GRAMMAR_CHARS, MAX_SCHEMA_DEPTH, Guidance
from server.sampling_params import SamplingParams

PROMPT = "The quick brown fox"


def generate(server, timeout=120, **parameters):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, **parameters}}
    return httpx.post(f"{server.url}/generate", json=body, timeout=timeout)


def chat(server, **fields):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("top_k", [2**63, 10**30, U32 + 1])
def test_a_top_k_past_u32_is_422_for_its_request_while_others_finish(tiny_server, top_k):
    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(generate, tiny_server, max_new_tokens=30) for _ in range(2)]
        bad = generate(tiny_server, do_sample=True, top_k=top_k)
        assert [f.result().status_code for f in others] == [200, 200]
    assert bad.status_code == 422
    assert bad.json()["error"] == f"Input validation error: `top_k` must be > 0 and <= {U32}. Given: {top_k}"


def test_a_top_k_larger_than_the_vocabulary_keeps_every_token(tiny_server):
    same = [generate(tiny_server, do_sample=True, seed=5, top_k=k).json()["generated_text"] for k in (U32, None)]
    assert same[0] == same[1]


@pytest.mark.parametrize("field, value, message", [
    ("seed", U64 + 1, f"`seed` must be >= 0 and <= {U64}. Given: {U64 + 1}"),
    ("max_new_tokens", U32 + 1, f"`max_new_tokens` must be > 0 and <= {U32}. Given: {U32 + 1}"),
    ("temperature", 1e400, "`temperature` must be a finite number"),
])
def test_generate_fields_past_their_type_are_422(tiny_server, field, value, message):
    r = httpx.post(f"{tiny_server.url}/generate", timeout=60,
                   content=json.dumps({"inputs": PROMPT, "parameters": {field: value}}).replace("Infinity", "1e400"),
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == f"Input validation error: {message}"


@pytest.mark.parametrize("key", ["²", "٣", "1" * 5000, "-1", "1.5", " 7"])
def test_logit_bias_keys_that_are_not_token_ids_are_422_naming_the_key(tiny_server, key):
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(f"{tiny_server.url}{route}", json={**body, "max_tokens": 2, "logit_bias": {key: 1}},
                       timeout=60)
        assert r.status_code == 422, r.text
        shown = key if len(key) <= 20 else key[:20] + "..."
        assert r.json()["error"] == f"Input validation error: `logit_bias` keys must be token ids. Given: {shown!r}"


def nested_array_schema(depth: int) -> str:
    """As JSON text: Python's own encoder could not write the deepest of them."""
    return '{"type": "array", "items": ' * depth + '{"type": "integer"}' + "}" * depth


@pytest.mark.parametrize("depth", [100, 480, 900, 5000])
def test_a_schema_nested_too_deep_is_422(tiny_server, depth):
    for grammar in (nested_array_schema(depth), '"' + nested_array_schema(depth).replace('"', '\\"') + '"'):
        body = '{"inputs": "Hi", "parameters": {"max_new_tokens": 4, "grammar": {"type": "json", "value": %s}}}'
        r = httpx.post(f"{tiny_server.url}/generate", content=body % grammar, timeout=60,
                       headers={"content-type": "application/json"})
        if r.status_code == 400:  # past what this Python's JSON parser reads: the body itself is refused
            assert depth > 1000 and grammar.startswith("{") and r.json()["error_type"] == "validation"
            continue
        assert r.status_code == 422, r.text[:300]
        assert r.json()["error"] == ("Input validation error: grammar is not valid: the schema nests more than "
                                     f"{MAX_SCHEMA_DEPTH} levels of objects and arrays")


def test_a_schema_within_the_depth_limit_is_enforced(tiny_server):
    schema = json.loads(nested_array_schema(MAX_SCHEMA_DEPTH // 2 - 1))
    r = generate(tiny_server, max_new_tokens=80, grammar={"type": "json", "value": schema})
    assert r.status_code == 200


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_tiny_temperature_is_greedy(tiny_server, temperature):
    greedy = generate(tiny_server, max_new_tokens=12).json()["generated_text"]
    r = generate(tiny_server, max_new_tokens=12, do_sample=True, temperature=temperature)
    assert r.status_code == 200 and r.json()["generated_text"] == greedy
    r = chat(tiny_server, temperature=temperature, max_tokens=12)
    assert r.json()["choices"][0]["message"]["content"] == chat(tiny_server, temperature=0, max_tokens=12).json()[
        "choices"][0]["message"]["content"]


def test_sampling_params_treat_a_tiny_temperature_as_greedy():
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(n=2, temperature=1e-300).temperature == 1e-5  # n samples need sampling


def test_a_grammar_past_the_size_limit_is_422(tiny_server):
    regex = "a" * (MAX_GRAMMAR_CHARS + 1)
    r = generate(tiny_server, grammar={"type": "regex", "value": regex})
    assert r.status_code == 422
    assert r.json()["error"] == (f"Input validation error: grammar is not valid: the regex has {len(regex)} "
                                 f"characters; at most {MAX_GRAMMAR_CHARS} are allowed")


def test_the_compiled_grammar_cache_is_bounded_in_entries_and_size(tiny_llm, monkeypatch):
    import server.engine.guidance as guidance

    engine = tiny_llm.engine
    g = Guidance(engine.tokenizer, engine.config.model.vocab_size, engine.eos_token_ids, on_gpu=False)
    for i in range(CACHE_ENTRIES + 10):
        g.grammar(SamplingParams(guided_regex=f"(x{i})+"))
    assert len(g._compiled) == CACHE_ENTRIES
    monkeypatch.setattr(guidance, "CACHE_CHARS", 300_000)
    for i in range(12):
        g.grammar(SamplingParams(guided_regex="(" + "|".join(f"w{i}x{j}" for j in range(5000)) + ")"))
    assert g._compiled_chars <= 300_000 and len(g._compiled) < 12
    assert g._compiled_chars == sum(len(source) + len(grammar) for (_, source), grammar in g._compiled.items())


def test_every_limit_names_a_field_of_its_model():
    from server.api import openai_schemas, tgi_schemas

    for model_name, limits in LIMITS.items():
        model = getattr(tgi_schemas, model_name, None) or getattr(openai_schemas, model_name)
        assert set(limits) <= set(model.model_fields), model_name


def test_the_published_schema_carries_the_limits(tiny_server):
    schema = httpx.get(f"{tiny_server.url}/openapi.json").json()["components"]["schemas"]

    def branch(model, field, kind):
        prop = schema[model]["properties"][field]
        return next(b for b in prop.get("anyOf", [prop]) if b.get("type") == kind)

    assert branch("GenerateParameters", "top_k", "integer") == {"type": "integer", "exclusiveMinimum": 0,
                                                                 "maximum": U32}
    assert branch("GenerateParameters", "best_of", "integer")["maximum"] == 2  # the server's --max-best-of
    assert branch("GenerateParameters", "top_p", "number") == {"type": "number", "exclusiveMinimum": 0.0,
                                                                "exclusiveMaximum": 1.0}
    assert branch("GenerateParameters", "truncate", "integer")["maximum"] == 200  # --max-input-tokens
    assert branch("GenerateParameters", "stop", "array")["maxItems"] == 4
    assert branch("GenerateRequest", "inputs", "string")["minLength"] == 1
    assert branch("ChatRequest", "temperature", "number") == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert branch("ChatRequest", "top_logprobs", "integer")["maximum"] == 20
    assert branch("CompletionRequest", "n", "integer")["maximum"] == 2


def test_invocations_documents_its_body_and_get_root_agrees_with_its_methods(tiny_server):
    spec = httpx.get(f"{tiny_server.url}/openapi.json").json()
    body = spec["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {option["$ref"].rsplit("/", 1)[1] for option in body["anyOf"]}
    assert refs == {"GenerateRequest", "ChatRequest", "CompletionRequest"}
    for path, operations in spec["paths"].items():
        expected = {m.upper() for m in operations} | {"OPTIONS"} | ({"HEAD"} if "get" in operations else set())
        r = httpx.options(f"{tiny_server.url}{path}")
        assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == expected, path
        r = httpx.request("PATCH", f"{tiny_server.url}{path}")
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == expected, path
        assert r.json() == {"error": "Method Not Allowed", "error_type": "method_not_allowed"}
    assert {"get", "post"} <= set(spec["paths"]["/"])
    assert httpx.get(f"{tiny_server.url}/").status_code == 200
    assert httpx.post(f"{tiny_server.url}/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
                      ).status_code == 200


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def distinct_regex(seed: int, chars: int) -> str:
    """A regex of about `chars` characters that no other seed gives: words of its own."""
    words, size, i = [], 0, 0
    while size < chars - 64:
        word = f"s{seed}w{i}"
        words.append(word)
        size += len(word) + 1
        i += 1
    return "(" + "|".join(words) + ")"


def test_distinct_large_grammars_leave_the_servers_memory_flat(tiny_server):
    def run(seeds):
        for seed in seeds:
            grammar = {"type": "regex", "value": distinct_regex(seed, MAX_GRAMMAR_CHARS - 1000)}
            assert generate(tiny_server, max_new_tokens=2, grammar=grammar).status_code == 200

    run(range(10))  # the allocator's and the cache's first growth
    before = rss_mb(tiny_server.process.pid)
    run(range(10, 40))
    grown = rss_mb(tiny_server.process.pid) - before
    assert grown < 30, f"RSS grew {grown:.0f} MB over 30 distinct {MAX_GRAMMAR_CHARS // 1024} KiB grammars"
