"""Request bodies -> engine inputs, with TGI's limits and TGI's own error messages.

Everything a client can get wrong is caught here, before the engine sees the request, and
answered with 422 `{"error": "Input validation error: ...", "error_type": "validation"}`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from server.api.errors import validation_error
from server.api.guided import tgi_grammar
from server.api.openai_schemas import ChatRequest, CompletionRequest
from server.api.settings import ServerSettings
from server.api.tgi_schemas import GenerateParameters
from server.engine.tokenizer import Tokenizer
from server.sampling_params import SamplingParams


@dataclass
class GenerateInputs:
    """A validated `/generate` request."""

    token_ids: list[int]
    params: SamplingParams
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise validation_error(f"`{name}` must be a finite number")


def encode_inputs(tokenizer: Tokenizer, text: str, truncate: int | None,
                  settings: ServerSettings) -> list[int]:
    if not text:
        raise validation_error("`inputs` cannot be empty")
    if truncate is not None and not 1 <= truncate <= settings.max_input_tokens:
        raise validation_error(f"`truncate` must be strictly positive and less than "
                               f"{settings.max_input_tokens}. Given: {truncate}")
    token_ids = tokenizer.encode(text)
    if truncate is not None:
        token_ids = token_ids[-truncate:]
    if not token_ids:
        raise validation_error("`inputs` cannot be empty")
    return token_ids


def check_lengths(num_input: int, max_new_tokens: int | None, settings: ServerSettings) -> int:
    """Check the input against the limits; return max_new_tokens, defaulted to what is left."""
    if num_input > settings.max_input_tokens:
        raise validation_error(f"`inputs` must have less than {settings.max_input_tokens} tokens. "
                               f"Given: {num_input}")
    if max_new_tokens is None:
        return settings.max_total_tokens - num_input
    if num_input + max_new_tokens > settings.max_total_tokens:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {settings.max_total_tokens}. "
            f"Given: {num_input} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
    return max_new_tokens


def validate_generate(p: GenerateParameters, inputs: str, tokenizer: Tokenizer,
                      settings: ServerSettings, stream: bool) -> GenerateInputs:
    """TGI's `validate()`: the checks, their order and their messages."""
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty"):
        _finite(name, getattr(p, name))
    sampling = bool(p.do_sample) or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    best_of = p.best_of if p.best_of is not None else 1
    if best_of != 1:
        if settings.max_best_of == 1:
            raise validation_error("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= settings.max_best_of:
            raise validation_error(f"`best_of` must be > 0 and <= {settings.max_best_of}. Given: {best_of}")
        if stream:
            raise validation_error("`best_of` != 1 is not supported when streaming tokens")
        if not sampling:
            raise validation_error("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise validation_error("`seed` must not be set when `best_of` > 1")
    if p.decoder_input_details and stream:
        raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0:
        raise validation_error("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0:
        raise validation_error("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2 <= frequency_penalty <= 2:
        raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = 1.0 if p.top_p is None else p.top_p
    if p.top_p is not None and not 0 < top_p < 1:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    if p.typical_p is not None and not 0 < typical_p < 1:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    stop = p.stop or []
    if len(stop) > settings.max_stop_sequences:
        raise validation_error(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. "
                               f"Given: {len(stop)}")
    if any(not s for s in stop):
        raise validation_error("`stop` sequences must not be empty")
    top_n = p.top_n_tokens or 0
    if top_n > settings.max_top_n_tokens:
        raise validation_error(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. "
                               f"Given: {top_n}")
    guided = tgi_grammar(p.grammar, settings)
    if p.adapter_id is not None and p.adapter_id != settings.model_id:
        raise validation_error(f"adapter `{p.adapter_id}` is not loaded: this server serves no LoRA adapters")
    token_ids = encode_inputs(tokenizer, inputs, p.truncate, settings)
    max_new_tokens = check_lengths(len(token_ids), p.max_new_tokens, settings)
    params = SamplingParams(
        n=best_of, best_of=best_of, temperature=temperature if sampling else 0.0,
        top_k=p.top_k or 0, top_p=top_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        seed=p.seed, stop=stop, include_stop_str_in_output=True,  # TGI keeps the stop text
        max_tokens=max_new_tokens, logprobs=top_n,
        prompt_logprobs=0 if p.decoder_input_details else None, skip_special_tokens=True,
        watermark=bool(p.watermark), watermark_gamma=settings.watermark_gamma,
        watermark_delta=settings.watermark_delta, **guided)
    return GenerateInputs(token_ids, params, top_n, bool(p.details or p.decoder_input_details),
                          bool(p.decoder_input_details), bool(p.return_full_text))


def openai_params(body: ChatRequest | CompletionRequest, num_input: int, settings: ServerSettings,
                  max_tokens: int | None, num_logprobs: int, best_of: int | None = None,
                  guided: dict | None = None) -> SamplingParams:
    """OpenAI's fields -> SamplingParams; `temperature: 0` means greedy, as in OpenAI."""
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        _finite(name, getattr(body, name))
    n = body.n or 1
    best_of = best_of or n
    if best_of < n:
        raise validation_error(f"`best_of` must be >= `n`. Given: {best_of} and {n}")
    if best_of > settings.max_best_of and best_of > 1:
        raise validation_error(f"`n` and `best_of` must be > 0 and <= {settings.max_best_of}. Given: {best_of}")
    temperature = 1.0 if body.temperature is None else body.temperature
    if best_of > 1 and temperature == 0:
        raise validation_error("you must use sampling (`temperature` > 0) when `n` or `best_of` is > 1")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise validation_error("`top_p` must be > 0.0 and <= 1.0")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(body, name) or 0.0
        if not -2 <= value <= 2:
            raise validation_error(f"`{name}` must be >= -2.0 and <= 2.0")
    if max_tokens == 0:
        raise validation_error("`max_tokens` must be strictly positive")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop_sequences:
        raise validation_error(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. "
                               f"Given: {len(stop)}")
    if any(not s for s in stop):
        raise validation_error("`stop` sequences must not be empty")
    if num_logprobs > settings.max_logprobs:
        raise validation_error(f"`top_logprobs` must be >= 0 and <= {settings.max_logprobs}. "
                               f"Given: {num_logprobs}")
    logit_bias = {}
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise validation_error(f"`logit_bias` keys must be token ids. Given: {key!r}")
        if not -100 <= bias <= 100:
            raise validation_error(f"`logit_bias` values must be >= -100 and <= 100. Given: {bias}")
        logit_bias[int(key)] = bias
    max_new_tokens = check_lengths(num_input, max_tokens, settings)
    return SamplingParams(
        n=n, best_of=best_of, temperature=temperature, top_p=top_p,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed, stop=stop, max_tokens=max_new_tokens, logprobs=num_logprobs,
        logit_bias=logit_bias, **(guided or {}))
