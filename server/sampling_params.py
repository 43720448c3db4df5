"""Per-request sampling settings, with vLLM's field names, validated where they enter."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature == 0` means greedy, and so does one below GREEDY_BELOW (as in vLLM): dividing
    logits by it would overflow them. With best_of > 1, which needs sampling, such a
    temperature is raised to GREEDY_BELOW instead: as near to greedy as sampling goes. `seed` makes sampling reproducible whatever else shares the
    batch. `n` sequences are returned out of `best_of` sampled (ranked by cumulative logprob).
    Stop strings are cut from the text unless `include_stop_str_in_output`. `max_tokens=0`
    generates nothing: the prompt is only scored (with `prompt_logprobs`). `guided_json` (a
    JSON schema, as a dict or its JSON text) or `guided_regex` constrain the output token by
    token: it parses and validates, or matches, unless `max_tokens` cuts it short first.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids
    watermark: bool = False  # Kirchenbauer's watermark: favour a green list after each token
    watermark_gamma: float = 0.5  # the green share of the vocabulary (TGI's default)
    watermark_delta: float = 2.0  # the bias added to green tokens' logits (TGI's default)
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == -1:  # vLLM's older spelling of "disabled"
            self.top_k = 0
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < GREEDY_BELOW:
            self.temperature = 0.0 if self.best_of == 1 else GREEDY_BELOW
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if isinstance(self.guided_json, str):
            try:
                self.guided_json = json.loads(self.guided_json)
            except json.JSONDecodeError as error:
                raise ValueError(f"guided_json is not valid JSON: {error}") from None
            except RecursionError:
                raise ValueError("guided_json nests too deeply to be read") from None
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        for name in ("temperature", "top_p", "typical_p", "min_p", "repetition_penalty",
                     "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}")
        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}")
        if self.best_of < self.n:
            bad(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        if self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}")
        if self.best_of > 1 and self.temperature == 0:
            bad("best_of > 1 needs sampling (temperature > 0)")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            bad(f"typical_p must be in (0, 1], got {self.typical_p}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            bad(f"top_k must be positive, or 0 or -1 to disable it, got {self.top_k}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if self.max_tokens is not None and self.max_tokens < 0:
            bad(f"max_tokens must be non-negative (0: score the prompt only), got {self.max_tokens}")
        if self.min_tokens < 0:
            bad(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                bad(f"{name} must be non-negative, got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            bad(f"seed must be in [0, 2**64), got {self.seed}")
        if not 0 < self.watermark_gamma < 1 or not math.isfinite(self.watermark_delta):
            bad(f"watermark_gamma must be in (0, 1) and watermark_delta finite, got "
                f"{self.watermark_gamma} and {self.watermark_delta}")
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or token_id < 0:
                bad(f"logit_bias keys must be token ids, got {token_id!r}")
            if not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                bad(f"logit_bias values must be in [-100, 100], got {bias!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop strings must be non-empty strings")
        if self.guided_json is not None and not isinstance(self.guided_json, dict):
            bad(f"guided_json must be a JSON schema object, got {self.guided_json!r}")
        if self.guided_regex is not None and (not isinstance(self.guided_regex, str) or not self.guided_regex):
            bad(f"guided_regex must be a non-empty string, got {self.guided_regex!r}")
        if self.guided_json is not None and self.guided_regex is not None:
            bad("guided_json and guided_regex cannot be combined")
        if self.guided and self.min_tokens:
            bad("min_tokens cannot be combined with guided decoding: the grammar decides where the output ends")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def guided(self) -> bool:
        return self.guided_json is not None or self.guided_regex is not None


@dataclass(frozen=True)
class LoRARequest:
    """Which LoRA adapter a request uses, as vLLM names it: `lora_name` is one of the adapters the
    engine loaded at start (`LLM(..., lora_adapters=...)`, `--lora-adapters`). `lora_int_id` and
    `lora_path` are accepted for vLLM's callers and not read: adapters are loaded at start."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str | None = None
