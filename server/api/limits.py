"""The numeric bounds of every request field, in one table.

The validators check requests against it and the published OpenAPI schema is made from it
(`openapi_with_limits`), so that what a client (or a fuzzer) reads is what the server enforces.
The types are TGI's: `max_new_tokens` and `top_k` are u32, seeds u64, floats finite. A bound
may name a `ServerSettings` field (`max_best_of`), read when the app is made. Messages are
TGI's own where it has one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel

from server.api.errors import validation_error
from server.api.settings import ServerSettings

U32 = 2**32 - 1
U64 = 2**64 - 1


@dataclass(frozen=True)
class Limit:
    low: float | None = None
    high: float | str | None = None  # a number, or the name of a ServerSettings field
    low_open: bool = False  # low itself is refused
    high_open: bool = False
    message: str | None = None  # TGI's own wording, with {high} and {value}
    size: str | None = None  # "items" (a list's length) or "chars" (a string's): bounds its size

    def high_value(self, settings: ServerSettings) -> float | None:
        return getattr(settings, self.high) if isinstance(self.high, str) else self.high

    def check(self, name: str, value, settings: ServerSettings) -> None:
        if value is None or (self.size and not isinstance(value, list if self.size == "items" else str)):
            return
        if self.size:
            value = len(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise validation_error(f"`{name}` must be a finite number")
        high = self.high_value(settings)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = high is not None and (value >= high if self.high_open else value > high)
        if not (below or above):
            return
        if self.message:
            raise validation_error(f"`{name}` " + self.message.format(high=high, value=value))
        if below and self.low == 0 and self.low_open and (high is None or high >= U32):
            raise validation_error(f"`{name}` must be strictly positive")  # TGI's, under a type's bound
        floats = isinstance(self.low, float) or isinstance(high, float)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low}")
        if high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {high}")
        given = "" if floats else f". Given: {value}"  # TGI names the value for integers only
        raise validation_error(f"`{name}` must be {' and '.join(parts)}{given}")

    def schema(self, settings: ServerSettings) -> dict:
        """JSON Schema's keywords for these bounds (sizes are closed: low_open is for numbers)."""
        high = self.high_value(settings)
        if self.size:
            unit = "Items" if self.size == "items" else "Length"
            return {key: value for key, value in ((f"min{unit}", self.low), (f"max{unit}", high))
                    if value is not None}
        out = {}
        if self.low is not None:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if high is not None:
            out["exclusiveMaximum" if self.high_open else "maximum"] = high
        return out

    def applies_to(self, branch: dict) -> bool:
        kinds = {"items": ("array",), "chars": ("string",)}.get(self.size, ("integer", "number"))
        return branch.get("type") in kinds


POSITIVE_U32 = Limit(0, U32, low_open=True)
SEED = Limit(0, U64)
PENALTY = Limit(-2.0, 2.0)
POSITIVE_FLOAT = Limit(0.0, low_open=True)
PROBABILITY = Limit(0.0, 1.0, low_open=True, high_open=True)
STOP = Limit(high="max_stop_sequences", size="items", message="supports up to {high} stop sequences. Given: {value}")

# Each model's fields, by the pydantic model's class name (a subclass takes its bases' rows).
LIMITS: dict[str, dict[str, Limit]] = {
    "GenerateParameters": {
        "best_of": Limit(0, "max_best_of", low_open=True),
        "max_new_tokens": POSITIVE_U32,
        "top_k": POSITIVE_U32,
        "seed": SEED,
        "top_n_tokens": Limit(0, "max_top_n_tokens"),
        "truncate": Limit(0, "max_input_tokens", low_open=True,
                          message="must be strictly positive and less than {high}. Given: {value}"),
        "temperature": POSITIVE_FLOAT,
        "repetition_penalty": POSITIVE_FLOAT,
        "frequency_penalty": PENALTY,
        "top_p": PROBABILITY,
        "typical_p": PROBABILITY,
        "stop": STOP,
    },
    "GenerateRequest": {
        "inputs": Limit(1, size="chars", message="cannot be empty"),
    },
    "SamplingFields": {
        "max_tokens": POSITIVE_U32,
        "temperature": Limit(0.0, 2.0),
        "top_p": Limit(0.0, 1.0, low_open=True),
        "n": Limit(0, "max_best_of", low_open=True,
                   message="must be > 0 and <= {high}. Given: {value}"),
        "seed": SEED,
        "frequency_penalty": PENALTY,
        "presence_penalty": PENALTY,
        "stop": STOP,
        "top_k": Limit(-1, U32),
        "min_p": Limit(0.0, 1.0),
        "repetition_penalty": POSITIVE_FLOAT,
        "min_tokens": Limit(0, U32),
    },
    "ChatRequest": {
        "max_completion_tokens": POSITIVE_U32,
        "top_logprobs": Limit(0, "max_logprobs"),
    },
    "CompletionRequest": {
        "max_tokens": Limit(0, U32),  # 0 with `echo`: the prompt and its logprobs alone
        "best_of": Limit(0, "max_best_of", low_open=True),
        "logprobs": Limit(0, "max_logprobs"),
        "suffix": Limit(high=0, size="chars", message="is not supported"),
    },
}

LOGIT_BIAS = Limit(-100.0, 100.0)
TOKEN_ID_KEY = "^[0-9]{1,10}$"  # a logit_bias key (the engine checks it against the vocabulary)


def limits_of(model: type[BaseModel]) -> dict[str, Limit]:
    out: dict[str, Limit] = {}
    for cls in reversed(model.__mro__):
        out.update(LIMITS.get(cls.__name__, {}))
    return out


def check_limits(body: BaseModel, settings: ServerSettings) -> None:
    """422 with the first field of `body` outside its bounds."""
    for name, limit in limits_of(type(body)).items():
        limit.check(name, getattr(body, name), settings)


def openapi_with_limits(schema: dict, models: list[type[BaseModel]], settings: ServerSettings) -> dict:
    """The OpenAPI document with each model's numeric fields bounded as the table says."""
    components = schema.get("components", {}).get("schemas", {})
    for model in models:
        properties = components.get(model.__name__, {}).get("properties", {})
        for name, limit in limits_of(model).items():
            field = properties.get(name)
            if field is None:
                continue
            for branch in field.get("anyOf", [field]):
                if limit.applies_to(branch):
                    branch.update(limit.schema(settings))
    return schema
