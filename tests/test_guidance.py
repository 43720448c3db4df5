"""Guided decoding: a tiny random model, which knows nothing of JSON, writes only what the
grammar allows: JSON that validates against each schema, text that matches each regex."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from benchmarks.json_schemas import REGEXES, SCHEMAS, WEATHER
from server import LLM, SamplingParams

PROMPTS = ["Reply in JSON:", "The answer is", "{"]
DRAWS = [dict(temperature=0), dict(temperature=1.0, seed=1)]


def completions(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_a_random_model_writes_json_that_validates_against_every_schema(tiny_llm):
    cases = [(name, schema, draw) for name, (schema, _, _) in SCHEMAS.items() for draw in DRAWS]
    params = [SamplingParams(max_tokens=200, guided_json=schema, **draw) for _, schema, draw in cases]
    outputs = completions(tiny_llm, [PROMPTS[i % len(PROMPTS)] for i in range(len(cases))], params)
    for (name, schema, _), output in zip(cases, outputs):
        assert output.finish_reason == "stop", (name, output.text)
        jsonschema.validate(json.loads(output.text), schema)


def test_a_random_model_writes_text_that_matches_every_regex(tiny_llm):
    cases = [(regex, draw) for regex, _, _ in REGEXES.values() for draw in DRAWS]
    params = [SamplingParams(max_tokens=40, guided_regex=regex, **draw) for regex, draw in cases]
    for (regex, _), output in zip(cases, completions(tiny_llm, ["Write:"] * len(cases), params)):
        assert output.finish_reason == "stop" and re.fullmatch(regex, output.text), (regex, output.text)


@pytest.mark.parametrize("name", SCHEMAS)
def test_the_grammar_takes_the_instance_and_refuses_the_near_miss(tiny_llm, name):
    guidance = tiny_llm.engine.guidance
    schema, instance, near_miss = SCHEMAS[name]
    grammar = guidance.grammar(SamplingParams(guided_json=schema))

    def accepts(value) -> bool:
        matcher = guidance.matcher(grammar)
        tokens = guidance.tokenizer.tokenize_str(json.dumps(value, ensure_ascii=False))
        return matcher.consume_tokens(tokens) and matcher.is_accepting()

    assert accepts(instance) and not accepts(near_miss)


def test_guided_rows_leave_the_other_rows_of_their_batch_unchanged(tiny_llm):
    plain = [SamplingParams(temperature=0.8, seed=seed, max_tokens=12, ignore_eos=True) for seed in range(3)]
    alone = [o.token_ids for o in completions(tiny_llm, PROMPTS, plain)]
    guided = [SamplingParams(temperature=0.8, seed=seed, max_tokens=12, guided_json=WEATHER) for seed in range(3)]
    mixed = completions(tiny_llm, PROMPTS + PROMPTS, plain + guided)
    assert [o.token_ids for o in mixed[:3]] == alone


def test_steps_queued_ahead_give_the_tokens_of_steps_run_one_at_a_time(tiny_llm, monkeypatch):
    """With async scheduling a step's masks are filled after the step before it is read back
    and its forward pass already queued: the matchers must see every token all the same."""
    params = [SamplingParams(max_tokens=60, guided_json=schema, temperature=1.0, seed=3)
              for schema, _, _ in SCHEMAS.values()]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    assert tiny_llm.engine.async_scheduling
    ahead = [(o.token_ids, o.text) for o in completions(tiny_llm, prompts, params)]
    monkeypatch.setattr(tiny_llm.engine, "async_scheduling", False)
    assert [(o.token_ids, o.text) for o in completions(tiny_llm, prompts, params)] == ahead


def test_a_guided_sequence_gives_the_same_tokens_after_preemption(mistral_v03_dir, tiny_llm):
    params = [SamplingParams(max_tokens=40, guided_json=schema, temperature=1.0, seed=7)
              for schema, _, _ in list(SCHEMAS.values())[:4]]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    expected = [o.token_ids for o in completions(tiny_llm, prompts, params)]
    small = LLM(mistral_v03_dir, block_size=4, max_batch_total_tokens=64)
    assert [o.token_ids for o in completions(small, prompts, params)] == expected
    assert small.engine.scheduler.num_preemptions > 0


def allowed_texts(llm, params, after: bytes = b"") -> set[str]:
    """The texts of the tokens a fresh grammar allows (once it took the token spelling `after`)."""
    guidance, tokenizer = llm.engine.guidance, llm.engine.tokenizer
    matcher = guidance.matcher(guidance.grammar(params))
    if after:
        assert matcher.consume_token(tokenizer.token_bytes().index(after))
    mask = guidance.allowed_tokens([0], [matcher]).bitmask[0].tolist()
    vocab = llm.engine.config.model.vocab_size
    return {tokenizer.decode([i]) for i in range(vocab) if mask[i // 32] >> (i % 32) & 1} - {""}


@pytest.mark.parametrize("params, after", [
    (SamplingParams(guided_regex=r"\d+"), b""), (SamplingParams(guided_regex=r"x[\d]+"), b"x"),
    (SamplingParams(guided_json={"type": "string", "pattern": r"^\d+$"}), b'"')], ids=["regex", "class", "schema"])
def test_digits_are_ascii_digits_as_in_json_schema_and_tgi(tiny_llm, params, after):
    """llguidance alone would let `\\d` take other scripts' digits (and the bytes of them)."""
    texts = allowed_texts(tiny_llm, params, after)
    assert texts and all(set(t) <= set("0123456789") for t in texts), sorted(texts)[:10]


def test_a_grammar_cut_short_by_max_tokens_ends_with_length(tiny_llm):
    output = completions(tiny_llm, PROMPTS[:1], SamplingParams(max_tokens=3, guided_json=WEATHER))[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 3
    assert '{"location": "'.startswith(output.text) or output.text.startswith('{"location": "')


def test_chat_follows_a_schema(tiny_llm):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    output = tiny_llm.chat(messages, SamplingParams(max_tokens=100, seed=0, guided_json=WEATHER),
                           use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(output.text), WEATHER)


@pytest.mark.parametrize("guided, reason", [
    (dict(guided_json={"type": "foo"}), "Invalid type: foo"),
    (dict(guided_json={"type": "integer", "minimum": 5, "maximum": 1}), "minimum (5) is greater than maximum (1)"),
    (dict(guided_json={"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}}), "'/$defs/b' does not exist"),
    (dict(guided_regex="(?=a)b"), "look-around, including look-ahead and look-behind, is not supported"),
    (dict(guided_regex="[a-"), "unclosed character class"),
])
def test_a_grammar_that_cannot_be_enforced_is_refused_with_its_reason(tiny_llm, guided, reason):
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:
        tiny_llm.generate(PROMPTS[:1], SamplingParams(**guided), use_tqdm=False)
    assert str(refused.value).startswith("grammar is not valid: ")
    assert not tiny_llm.engine.has_unfinished_requests()


def test_sampling_params_check_their_guided_fields():
    assert SamplingParams(guided_json='{"type": "object"}').guided_json == {"type": "object"}
    for bad in (dict(guided_json="{not json"), dict(guided_json=[1]), dict(guided_regex=""),
                dict(guided_json={"type": "object"}, guided_regex="a"),
                dict(guided_regex="a+", min_tokens=2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
