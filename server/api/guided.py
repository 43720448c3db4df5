"""The APIs' grammar fields (TGI's `grammar`, OpenAI's `response_format`) as SamplingParams'
guided fields, refused where they enter with TGI's 422 when they cannot be enforced."""
from __future__ import annotations

import json

from server.api.errors import validation_error
from server.api.settings import ServerSettings
from server.api.tgi_schemas import Grammar
from server.engine.async_engine import AsyncEngine
from server.engine.guidance import MAX_SCHEMA_DEPTH
from server.sampling_params import SamplingParams

ANY_OBJECT = {"type": "object"}  # OpenAI's json_object: any JSON object


def guided_json(schema, settings: ServerSettings) -> dict:
    """`schema` (an object, or its JSON text) as SamplingParams' keyword arguments."""
    if settings.disable_grammar_support:
        raise validation_error("grammar is not supported")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise validation_error(f"grammar is not valid: the schema is not JSON ({error})") from None
        except RecursionError:
            raise validation_error(f"grammar is not valid: the schema nests more than {MAX_SCHEMA_DEPTH} "
                                   "levels of objects and arrays") from None
    if not isinstance(schema, dict):
        raise validation_error("grammar is not valid: a JSON schema must be an object")
    return {"guided_json": schema}


def guided_regex(regex, settings: ServerSettings) -> dict:
    if settings.disable_grammar_support:
        raise validation_error("grammar is not supported")
    if not isinstance(regex, str) or not regex:
        raise validation_error("grammar is not valid: a regex must be a non-empty string")
    return {"guided_regex": regex}


def tgi_grammar(grammar: Grammar | None, settings: ServerSettings) -> dict:
    """TGI's `grammar`: `{"type": "json" | "json_object", "value": schema}`,
    `{"type": "json_schema", "value": {"name", "schema"}}` or `{"type": "regex", "value": regex}`."""
    if grammar is None:
        return {}
    if grammar.type == "regex":
        return guided_regex(grammar.value, settings)
    if grammar.type == "json_schema":
        if not isinstance(grammar.value, dict) or "schema" not in grammar.value:
            raise validation_error('grammar is not valid: a json_schema grammar\'s value is {"name", "schema"}')
        return guided_json(grammar.value["schema"], settings)
    return guided_json(grammar.value, settings)


def response_format(fmt: dict | None, settings: ServerSettings) -> dict:
    """OpenAI's `response_format` (`text`, `json_object`, `json_schema`), and TGI's own
    grammar shapes in its place (`{"type": "json" | "regex", "value": ...}`)."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return guided_json(fmt.get("value") or fmt.get("schema") or ANY_OBJECT, settings)
    if kind == "json_schema":
        spec = fmt.get("json_schema") or fmt.get("value") or {}
        return guided_json((spec.get("schema") or ANY_OBJECT) if isinstance(spec, dict) else spec, settings)
    if kind in ("json", "regex"):
        return tgi_grammar(Grammar(type=kind, value=fmt.get("value")), settings)
    raise validation_error(f"`response_format` type must be one of text, json_object, json_schema, json "
                           f"or regex. Given: {kind!r}")


def check_grammar(engine: AsyncEngine, params: SamplingParams) -> None:
    """Compile the request's grammar now, so that a bad one is a 422 before any stream starts."""
    try:
        engine.guidance.grammar(params)
    except ValueError as error:
        raise validation_error(str(error)) from None
