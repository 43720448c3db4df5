"""Tool calling as TGI does it: the tools and a prompt reach the chat template, and a JSON
grammar over the chosen functions shapes the reply as `{"function": {"_name": NAME, ...args}}`.

`tool_choice` picks the functions: `auto` (the default) adds `no_tool`, whose `content` is a
plain answer; `required` offers the tools alone; a named function (OpenAI's
`{"type": "function", "function": {"name": ...}}`, or TGI's bare name) offers only it; `none`
leaves the tools out, and the model answers in text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from server.api.errors import APIError, validation_error
from server.api.openai_schemas import Tool

# TGI's default `tool_prompt`, written after the last message.
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt. Respond in the format {name: function name, "
    "parameters: dictionary of argument name and its value}.Do not use variables.")

NO_TOOL = {"type": "function", "function": {
    "name": "no_tool", "description": "Open ended response with no specific tool selected",
    "parameters": {"type": "object", "properties": {
        "content": {"type": "string", "description": "The response content"}}, "required": ["content"]}}}


@dataclass
class ToolUse:
    tools: list[dict]  # what the chat template is given
    schema: dict  # the JSON schema of the reply


def tool_error(message: str) -> APIError:
    return APIError(422, message, "tool_error")


def tool_use(tools: list[Tool] | None, tool_choice) -> ToolUse | None:
    """The functions offered and the reply's grammar; None when no tool may be called."""
    if not tools:
        return None
    choice = _choice(tool_choice)
    if choice == "none":
        return None
    offered = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "auto":
        offered.append(NO_TOOL)
    elif choice != "required":
        offered = [t for t in offered if t["function"]["name"] == choice]
        if not offered:
            raise tool_error(f"Tool with name {choice} not found")
    functions = [t["function"] for t in offered]
    schema = {"type": "object", "properties": {"function": {"anyOf": [_call_schema(f) for f in functions]}},
              "required": ["function"]}
    for key in ("$defs", "definitions"):  # a function's `#/$defs/...` references, from the grammar's root
        definitions = {name: d for f in functions for name, d in (f.get("parameters") or {}).get(key, {}).items()}
        if definitions:
            schema[key] = definitions
    return ToolUse(offered, schema)


def _choice(tool_choice) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        return tool_choice["function"]["name"]
    raise validation_error('`tool_choice` must be "auto", "none", "required", a function name or '
                           '{"type": "function", "function": {"name": ...}}')


def _call_schema(function: dict) -> dict:
    """One function's call: its name as `_name`, then its parameters, in one object."""
    parameters = function.get("parameters") or {}
    schema = {"type": "object", "description": function.get("description", ""),
              "properties": {"_name": {"type": "string", "const": function["name"]},
                             **parameters.get("properties", {})},
              "required": ["_name", *parameters.get("required", [])]}
    if "additionalProperties" in parameters:
        schema["additionalProperties"] = parameters["additionalProperties"]
    return schema


def with_tool_prompt(messages: list[dict], use: ToolUse, tool_prompt: str | None,
                     template_takes_tools: bool) -> list[dict]:
    """The conversation with TGI's addition to its last message: the tool prompt, after the
    tools themselves when the chat template does not show them."""
    prompt = tool_prompt or DEFAULT_TOOL_PROMPT
    added = f"\n---\n{prompt}" if template_takes_tools else f"\n---\n{json.dumps(use.tools)}\n{prompt}"
    *earlier, last = messages
    content = last.get("content")
    if isinstance(content, list):
        content = [*content, {"type": "text", "text": added}]
    else:
        content = (content or "") + added
    return [*earlier, {**last, "content": content}]
