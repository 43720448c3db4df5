"""Chat templates: jinja2 code that came with the weights, rendered in a sandbox with the
helpers templates expect, and bounds on the output's size and the time it takes."""
from __future__ import annotations

import hashlib
import json
import re
import string
import sys
import time
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_OUTPUT_CHARS = 1_000_000
MAX_TEMPLATE_SECONDS = 1.0


def render_template(template: str, **variables) -> str:
    """Render a chat template in jinja2's sandbox, with the helpers chat templates expect and
    bounds on the output size and the time taken. Any failure is a ValueError starting
    "Template error:"."""
    previous = sys.gettrace()
    sys.settrace(_time_limit(time.monotonic() + MAX_TEMPLATE_SECONDS))
    try:
        chunks, size = [], 0
        for chunk in _compile(template).generate(**variables):
            size += len(chunk)
            if size > MAX_TEMPLATE_OUTPUT_CHARS:
                raise ValueError(f"output exceeds {MAX_TEMPLATE_OUTPUT_CHARS} characters")
            chunks.append(chunk)
        return "".join(chunks)
    # The template is foreign code: whatever goes wrong inside it is the template's error.
    except Exception as e:
        raise ValueError(f"Template error: {e}") from e
    finally:
        sys.settrace(previous)


def _time_limit(deadline: float):
    """A trace function that stops a template's compiled code (and nothing else) past the
    deadline: jinja2's sandbox bounds what a template may touch, not how long it loops."""
    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rendering took longer than {MAX_TEMPLATE_SECONDS} s")
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None

    return call


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def template_variables(template: str) -> set[str]:
    """The variables a template reads that it does not set itself (`tools`, `messages` ...)."""
    return meta.find_undeclared_variables(_environment().parse(template))


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes HTML characters, which would put "\u003c" in prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def pick_template(chat_template: str | dict | None) -> str | None:
    # A tokenizer may carry several named templates; the unnamed use is "default", as in TGI.
    if isinstance(chat_template, dict):
        return chat_template.get("default")
    return chat_template


def flatten_content(messages: list[dict]) -> list[dict]:
    """OpenAI content given as a list of parts becomes the plain string templates expect."""
    flat = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            message = {**message, "content": text}
        flat.append(message)
    return flat


def tool_calls_as_text(messages: list[dict]) -> list[dict]:
    """For a template that knows no tool calls, as TGI renders them: an assistant turn's calls
    become its content (the calls as JSON, after any text it had), and a turn without content
    (`null`, or none at all) has an empty one, so that a template reading it does not fail."""
    out = []
    for message in messages:
        content = message.get("content") or ""
        calls = message.get("tool_calls")
        if calls:
            content = (content + "\n" if content else "") + json.dumps(calls, ensure_ascii=False)
            message = {key: value for key, value in message.items() if key != "tool_calls"}
        out.append({**message, "content": content})
    return out


_MISTRAL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")


def mistral_call_ids(messages: list[dict]) -> list[dict]:
    """Tool call ids as Mistral's formats demand them (9 letters or digits): an id of another
    shape ("call_abc123" from another server, or the client's own) is replaced by one made from
    it, the same in the assistant's call and in the tool's answer."""
    def fit(call_id):
        if not isinstance(call_id, str) or _MISTRAL_CALL_ID.fullmatch(call_id):
            return call_id
        digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
        return "".join(_BASE62[(digest >> (6 * i)) % 62] for i in range(9))

    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [{**call, "id": fit(call.get("id"))} if isinstance(call, dict) else call
                                                 for call in message["tool_calls"]]}
        if "tool_call_id" in message:
            message = {**message, "tool_call_id": fit(message["tool_call_id"])}
        out.append(message)
    return out


_BASE62 = string.digits + string.ascii_letters
