"""A dozen JSON schemas, each with an instance and a counterexample (a near miss that breaks
the feature the schema is about). The grammar engines' benchmark walks both token by token:
an engine covers a schema when it accepts the instance and refuses the counterexample. The
tests hold every constrained output to its schema, which a random model must be able to end:
strings, arrays and numbers are bounded (a model can write digits or characters forever)."""
from __future__ import annotations

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 40,
                     "description": "The city and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
}

SCHEMAS: dict[str, tuple[dict, object, object]] = {  # schema, instance, counterexample
    "flat_object": (
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
         "required": ["name", "age"]},
        {"name": "Ada Lovelace", "age": 36},
        {"name": "Ada Lovelace", "age": 36.5}),
    "nested_objects": (
        {"type": "object", "properties": {
            "person": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 20},
                "address": {"type": "object", "properties": {
                    "street": {"type": "string", "maxLength": 20}, "city": {"type": "string", "maxLength": 20}},
                    "required": ["street", "city"]}},
                "required": ["name", "address"]}},
         "required": ["person"]},
        {"person": {"name": "Grace", "address": {"street": "1 Navy Way", "city": "Arlington"}}},
        {"person": {"name": "Grace", "address": {"street": "1 Navy Way"}}}),
    "array_of_objects": (
        {"type": "object", "properties": {"items": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 999},
                "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 10}}},
                "required": ["id", "tags"]}}},
         "required": ["items"]},
        {"items": [{"id": 1, "tags": ["red", "blue"]}, {"id": 2, "tags": []}]},
        {"items": []}),
    "enums": (
        {"type": "object", "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L", 42]}},
         "required": ["color", "size"]},
        {"color": "green", "size": "M"},
        {"color": "purple", "size": "M"}),
    "bounded_numbers": (
        {"type": "object", "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
            "count": {"type": "integer", "minimum": 1, "maximum": 10},
            "delta": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 5}},
         "required": ["score", "count", "delta"]},
        {"score": 0.75, "count": 7, "delta": -4},
        {"score": 1.5, "count": 7, "delta": -4}),
    "optional_fields": (
        {"type": "object", "properties": {
            "title": {"type": "string", "maxLength": 20}, "subtitle": {"type": "string", "maxLength": 20},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
         "required": ["title"], "additionalProperties": False},
        {"title": "Dune", "year": 1965},
        {"title": "Dune", "author": "Frank Herbert"}),
    "string_patterns": (
        {"type": "object", "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "slug": {"type": "string", "pattern": "^[a-z]{1,8}(-[a-z]{1,8}){0,2}$"}},
         "required": ["code", "slug"]},
        {"code": "ABC-1234", "slug": "guided-decoding"},
        {"code": "AB-1234", "slug": "guided-decoding"}),
    "string_lengths": (
        {"type": "object", "properties": {
            "short": {"type": "string", "minLength": 2, "maxLength": 5},
            "words": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}},
         "required": ["short", "words"]},
        {"short": "abc", "words": ["one", "two"]},
        {"short": "abcdef", "words": []}),
    "booleans_and_nulls": (
        {"type": "object", "properties": {
            "active": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 20}},
         "required": ["active", "note"]},
        {"active": True, "note": None},
        {"active": "yes", "note": None}),
    "any_of": (
        {"type": "object", "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": -99, "maximum": 99},
                                {"type": "string", "maxLength": 10}]},
            "kind": {"const": "measurement"}},
         "required": ["value", "kind"]},
        {"value": 12, "kind": "measurement"},
        {"value": 1.5, "kind": "measurement"}),
    "definitions_and_refs": (
        {"type": "object", "$defs": {"point": {"type": "object", "properties": {
            "x": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.5},
            "y": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.5}}, "required": ["x", "y"]}},
         "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
         "required": ["start", "end"]},
        {"start": {"x": 0, "y": 1.5}, "end": {"x": -2, "y": 3}},
        {"start": {"x": 0}, "end": {"x": -2, "y": 3}}),
    "recursive_tree": (
        {"type": "object", "$defs": {"node": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 6},
            "children": {"type": "array", "maxItems": 1, "items": {"$ref": "#/$defs/node"}}},
            "required": ["label", "children"]}},
         "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]},
        {"root": {"label": "a", "children": [{"label": "b", "children": []}]}},
        {"root": {"label": "a", "children": [{"label": "b", "children": [{"label": "c", "children": []}] * 2}]}}),
    "tool_call": (
        {"type": "object", "properties": {"function": {"type": "object", "properties": {
            "_name": {"type": "string", "const": "get_weather"}, **WEATHER["properties"]},
            "required": ["_name", "location", "unit"]}},
         "required": ["function"]},
        {"function": {"_name": "get_weather", "location": "Paris, France", "unit": "celsius"}},
        {"function": {"_name": "get_time", "location": "Paris, France", "unit": "celsius"}}),
}

REGEXES: dict[str, tuple[str, str, str]] = {  # regex, match, near miss
    "phone": (r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", "(555) 123-4567", "(555) 1234-567"),
    "iso_date": (r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", "2024-02-29", "2024-13-01"),
    "ipv4": (r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])", "192.168.0.1",
             "192.168.0.256"),
    "choice": (r"(yes|no|maybe)", "maybe", "perhaps"),
    "email": (r"[a-z]{3,8}@[a-z]{3,6}\.(com|org)", "alice@mail.org", "alice@mail.net"),
}
