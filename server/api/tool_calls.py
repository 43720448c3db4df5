"""Reading a reply written under the tool grammar, `{"function": {"_name": NAME, ...args}}`,
as it grows: the function's name once it is whole, then its arguments as the text of a JSON
object, which streams as OpenAI's `tool_calls` deltas and joins to the final `arguments`.
`no_tool`'s `content` is read as the plain answer it stands for.
"""
from __future__ import annotations

import json
import re
import uuid

_NAME = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')
_CONTENT = re.compile(r'"content"\s*:\s*"')
_STRING_BODY = re.compile(r'(?:[^"\\]|\\u[0-9a-fA-F]{4}|\\[^u])*')  # stops before a partial escape


class ToolCallReader:
    def __init__(self):
        self.name: str | None = None
        self.call_id = uuid.uuid4().hex[:9]  # 9 characters: the length Mistral's formats demand
        self.arguments = ""  # the text given out so far
        self.content = ""
        self.complete = False  # the whole call was written

    @property
    def is_call(self) -> bool:
        return self.name is not None and self.name != "no_tool"

    def read(self, text: str, finished: bool) -> tuple[str, str]:
        """Given the reply's text so far: the arguments' new text, and (for `no_tool`) the
        answer's new text."""
        match = _NAME.match(text)
        if match is None:
            return "", ""
        self.name = json.loads(f'"{match.group(1)}"')
        rest = text[match.end():]
        if self.name == "no_tool":
            start = _CONTENT.search(rest)
            content = _string_prefix(rest[start.end():]) if start else ""
            new, self.content = content[len(self.content):], content
            return "", new
        self.complete = finished and _parses(text)
        arguments = ("{" + rest).rstrip()
        if self.complete or not finished:
            # The last brace closes the call, not the arguments: drop it at the end, and hold
            # it back until then.
            arguments = arguments[:-1] if arguments.endswith("}") else arguments
        new, self.arguments = arguments[len(self.arguments):], arguments
        return new, ""


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _string_prefix(raw: str) -> str:
    """The text of a JSON string whose body starts `raw`, as far as it is written."""
    return json.loads(f'"{_STRING_BODY.match(raw).group(0)}"')


def finish_reason(reader: ToolCallReader, reason: str | None) -> str | None:
    """OpenAI's: `tool_calls` once a call is whole, `length` when one was cut short."""
    if reason is None or not reader.is_call:
        return reason
    return "tool_calls" if reader.complete else "length"


def reply_message(text: str) -> tuple[dict, ToolCallReader]:
    """The whole reply as an OpenAI message: a tool call, `no_tool`'s answer, or (cut short
    before a function was named) the text itself."""
    reader = ToolCallReader()
    reader.read(text, finished=True)
    if reader.is_call:
        call = {"id": reader.call_id, "type": "function",
                "function": {"name": reader.name, "arguments": reader.arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}, reader
    return {"role": "assistant", "content": reader.content if reader.name else text}, reader


def stream_delta(reader: ToolCallReader, text: str, finished: bool) -> dict:
    """OpenAI's delta for a step of the reply: the call's id and name when the name is whole,
    then pieces of its arguments; `no_tool`'s answer as content."""
    named = reader.is_call
    arguments, content = reader.read(text, finished)
    if reader.is_call and not named:
        return {"tool_calls": [{"index": 0, "id": reader.call_id, "type": "function",
                                "function": {"name": reader.name, "arguments": arguments}}]}
    if reader.is_call:
        return {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]} if arguments else {}
    if reader.name is None and finished:
        return {"content": text}
    return {"content": content} if content else {}
