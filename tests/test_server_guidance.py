"""Guidance over HTTP: TGI's `grammar`, OpenAI's `response_format` and tools, through the real
clients; grammars that cannot be enforced are TGI's 422 naming the problem."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from openai import OpenAI, UnprocessableEntityError

from benchmarks.json_schemas import SCHEMAS, WEATHER
from server_process import ServerProcess

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                            "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def serve(model_dir, *flags) -> ServerProcess:
    # The tool prompt makes prompts longer than the session's tiny server allows.
    server = ServerProcess("--model-id", model_dir, "--max-total-tokens", "512", "--max-input-tokens", "400",
                           "--max-batch-total-tokens", "8192", *flags)
    try:
        return server.wait_ready()
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="module")
def server(mistral_v03_dir):
    server = serve(mistral_v03_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def generate(server, grammar, route="/generate", **parameters):
    body = {"inputs": "Reply:", "parameters": {"max_new_tokens": 120, "grammar": grammar, **parameters}}
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


@pytest.mark.parametrize("grammar", [
    {"type": "json", "value": SCHEMAS["nested_objects"][0]},
    {"type": "json", "value": json.dumps(SCHEMAS["array_of_objects"][0])},  # the schema as JSON text
    {"type": "json_object", "value": SCHEMAS["enums"][0]},
    {"type": "json_schema", "value": {"name": "numbers", "schema": SCHEMAS["bounded_numbers"][0]}},
])
def test_generate_with_a_json_grammar_writes_json_of_that_schema(server, grammar):
    schema = grammar["value"]["schema"] if grammar["type"] == "json_schema" else grammar["value"]
    schema = json.loads(schema) if isinstance(schema, str) else schema
    r = generate(server, grammar, do_sample=True, seed=3, details=True)
    assert r.status_code == 200 and r.json()["details"]["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)


def test_generate_stream_with_a_regex_grammar_matches_it(server):
    regex = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    r = generate(server, {"type": "regex", "value": regex}, route="/generate_stream")
    events = [json.loads(line[len("data:"):]) for line in r.text.splitlines() if line.startswith("data:")]
    assert re.fullmatch(regex, events[-1]["generated_text"])
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == events[-1]["generated_text"]


@pytest.mark.parametrize("grammar, message", [
    ({"type": "json", "value": {"type": "foo"}}, "grammar is not valid: Invalid type: foo"),
    ({"type": "json", "value": "{oops"}, "grammar is not valid: the schema is not JSON"),
    ({"type": "json_schema", "value": {"name": "x"}}, 'grammar is not valid: a json_schema grammar\'s value is'),
    ({"type": "regex", "value": 42}, "grammar is not valid: a regex must be a non-empty string"),
    ({"type": "regex", "value": r"\bword"}, "grammar is not valid: invalid regex"),
])
def test_a_grammar_that_cannot_be_enforced_is_422_naming_the_problem(server, grammar, message):
    for route in ("/generate", "/generate_stream"):
        r = generate(server, grammar, route=route)
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
        assert r.json()["error"].startswith(f"Input validation error: {message}")


def test_response_format_json_schema_and_json_object(client):
    schema = SCHEMAS["string_patterns"][0]
    reply = client.chat.completions.create(
        model="tgi", messages=ASK, max_tokens=100, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "codes", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = client.chat.completions.create(model="tgi", messages=ASK, max_tokens=100, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason in ("stop", "length")  # any object: it may run long
    assert reply.choices[0].message.content.startswith("{")


def test_a_tool_call_has_arguments_of_its_schema_whole_and_streamed(client):
    kwargs = dict(model="tgi", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, seed=5)
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    call = choice.message.tool_calls[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    deltas = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert "".join(c.function.arguments for c in calls) == call.function.arguments
    assert deltas[-1].finish_reason == "tool_calls"


def test_a_call_sent_back_with_its_result_is_answered(client):
    first = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, seed=5).choices[0].message
    call = first.tool_calls[0]
    conversation = ASK + [first.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "22"}]
    reply = client.chat.completions.create(model="tgi", messages=conversation, tools=TOOLS, max_tokens=20, seed=1)
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls


def test_tool_choice_none_answers_in_text_and_a_named_function_is_called(client):
    reply = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=5, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, tool_choice=named,
                                           max_tokens=120, seed=2)
    jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments), WEATHER)


def test_auto_may_answer_without_a_tool_and_is_never_left_broken(client):
    for seed in range(3):
        reply = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, max_tokens=60, seed=seed)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, message", [
    (dict(tool_choice={"type": "function", "function": {"name": "get_time"}}), "Tool with name get_time not found"),
    (dict(response_format={"type": "json_object"}), "Grammar and tools are mutually exclusive"),
])
def test_tool_errors_are_422(client, extra, message):
    with pytest.raises(UnprocessableEntityError) as refused:
        client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, max_tokens=5, **extra)
    assert refused.value.response.json() == {"error": message, "error_type": "tool_error"}


def test_disable_grammar_support_refuses_every_grammar(mistral_v03_dir):
    server = serve(mistral_v03_dir, "--disable-grammar-support")
    try:
        refused = {"error": "Input validation error: grammar is not supported", "error_type": "validation"}
        r = generate(server, {"type": "regex", "value": "a+"})
        assert r.status_code == 422 and r.json() == refused
        chat = {"model": "tgi", "messages": ASK, "max_tokens": 5}
        for extra in ({"tools": TOOLS}, {"response_format": {"type": "json_object"}}):
            r = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, **extra}, timeout=60)
            assert r.status_code == 422 and r.json() == refused
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "tools": TOOLS, "tool_choice": "none"})
        assert r.status_code == 200
    finally:
        server.stop()
