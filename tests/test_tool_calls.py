"""Tool calling's two halves without a model: the grammar over the offered functions, and the
reading of a reply written under it, whole or token by token."""
from __future__ import annotations

import json

import jsonschema
import pytest

from benchmarks.json_schemas import WEATHER
from server.api.errors import APIError
from server.api.openai_schemas import Tool
from server.api.tool_calls import ToolCallReader, finish_reason, reply_message, stream_delta
from server.api.tools import DEFAULT_TOOL_PROMPT, tool_use, with_tool_prompt

TOOLS = [Tool(function={"name": "get_weather", "description": "The weather now", "parameters": WEATHER}),
         Tool(function={"name": "get_time", "parameters": {"type": "object", "properties": {}}})]
CALL = {"function": {"_name": "get_weather", "location": "Paris, \"France\" 🇫🇷", "unit": "celsius"}}
REPLY = json.dumps(CALL, ensure_ascii=False)


def names(use) -> list[str]:
    return [t["function"]["name"] for t in use.tools]


def test_tool_choice_picks_the_functions_offered():
    assert names(tool_use(TOOLS, None)) == ["get_weather", "get_time", "no_tool"]
    assert names(tool_use(TOOLS, "auto")) == ["get_weather", "get_time", "no_tool"]
    assert names(tool_use(TOOLS, "required")) == ["get_weather", "get_time"]
    assert names(tool_use(TOOLS, {"type": "function", "function": {"name": "get_time"}})) == ["get_time"]
    assert names(tool_use(TOOLS, "get_time")) == ["get_time"]  # TGI's bare name
    assert tool_use(TOOLS, "none") is None and tool_use(None, "auto") is None
    with pytest.raises(APIError, match="Tool with name get_date not found") as refused:
        tool_use(TOOLS, "get_date")
    assert refused.value.status_code == 422 and refused.value.error_type == "tool_error"


def test_the_grammar_holds_a_call_to_its_functions_parameters():
    schema = tool_use(TOOLS, "required").schema
    jsonschema.validate(CALL, schema)
    jsonschema.validate({"function": {"_name": "get_time"}}, schema)
    for wrong in ({"function": {"_name": "get_weather", "location": "Paris"}},  # unit is required
                  {"function": {"_name": "get_date"}}, {}):
        assert not jsonschema.Draft202012Validator(schema).is_valid(wrong)


@pytest.mark.parametrize("key", ["$defs", "definitions"])
def test_a_functions_references_resolve_from_the_grammars_root(key):
    point = {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}
    parameters = {"type": "object", "properties": {"at": {"$ref": f"#/{key}/point"}}, "required": ["at"],
                  key: {"point": point}}
    schema = tool_use([Tool(function={"name": "locate", "parameters": parameters})], "required").schema
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"function": {"_name": "locate", "at": {"lat": 1.5}}})
    assert not validator.is_valid({"function": {"_name": "locate", "at": {"lon": 1.5}}})


def test_the_tool_prompt_follows_the_last_message_with_the_tools_when_the_template_lacks_them():
    use = tool_use(TOOLS, "auto")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    shown = with_tool_prompt(messages, use, None, template_takes_tools=True)
    assert shown[0] == messages[0]
    assert shown[1]["content"] == f"Weather in Paris?\n---\n{DEFAULT_TOOL_PROMPT}"
    listed = with_tool_prompt(messages, use, "Call one.", template_takes_tools=False)
    assert listed[1]["content"] == f"Weather in Paris?\n---\n{json.dumps(use.tools)}\nCall one."


def test_a_whole_reply_is_a_call_with_its_arguments_as_json_text():
    message, reader = reply_message(REPLY)
    call = message["tool_calls"][0]
    assert message["content"] is None and call["type"] == "function" and len(call["id"]) == 9
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": 'Paris, "France" 🇫🇷', "unit": "celsius"}
    assert finish_reason(reader, "stop") == "tool_calls"


def test_streamed_deltas_join_to_the_arguments_of_the_whole_reply():
    reader, pieces, first = ToolCallReader(), [], None
    for end in range(1, len(REPLY) + 1):  # one character at a time: the hardest split
        delta = stream_delta(reader, REPLY[:end], finished=end == len(REPLY))
        for call in delta.get("tool_calls", []):
            first = first or call
            pieces.append(call["function"]["arguments"])
    assert first["id"] == reader.call_id and first["function"]["name"] == "get_weather"
    assert "".join(pieces) == reply_message(REPLY)[0]["tool_calls"][0]["function"]["arguments"]


def test_a_call_cut_short_keeps_its_partial_arguments_and_ends_with_length():
    message, reader = reply_message(REPLY[:40])
    assert message["tool_calls"][0]["function"]["arguments"] == "{" + REPLY[len('{"function": {"_name": "get_weather", '):40]
    assert finish_reason(reader, "length") == "length"
    assert reply_message('{"function": {"_na')[0] == {"role": "assistant", "content": '{"function": {"_na'}


def test_no_tool_is_read_as_a_plain_answer_streamed_as_content():
    answer = 'Il fait "beau"\nà Paris \\ 🌞'
    reply = json.dumps({"function": {"_name": "no_tool", "content": answer}}, ensure_ascii=False)
    message, reader = reply_message(reply)
    assert message == {"role": "assistant", "content": answer}
    assert finish_reason(reader, "stop") == "stop"
    reader = ToolCallReader()
    streamed = "".join(stream_delta(reader, reply[:end], end == len(reply)).get("content", "")
                       for end in range(1, len(reply) + 1))
    assert streamed == answer
