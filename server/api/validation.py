"""Request bodies -> engine inputs, with TGI's limits and TGI's own error messages.

Everything a client can get wrong is caught here, before the engine sees the request, and
answered with 422 `{"error": "Input validation error: ...", "error_type": "validation"}`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from server.api.errors import APIError, validation_error
from server.api.guided import guided_json, guided_regex, tgi_grammar
from server.api.limits import LOGIT_BIAS, TOKEN_ID_KEY, check_limits
from server.api.openai_schemas import ChatRequest, CompletionRequest
from server.api.settings import ServerSettings
from server.api.tgi_schemas import GenerateRequest
from server.engine.tokenizer import Tokenizer
from server.sampling_params import LoRARequest, SamplingParams


@dataclass
class GenerateInputs:
    """A validated `/generate` request."""

    token_ids: list[int]
    params: SamplingParams
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    lora: LoRARequest | None


def encode_inputs(tokenizer: Tokenizer, text: str, truncate: int | None) -> list[int]:
    """The tokens of `inputs` (already checked against its limits), cut to the last `truncate`."""
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


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams from checked fields; what it refuses still is the client's mistake."""
    try:
        return SamplingParams(**fields)
    except ValueError as error:
        raise validation_error(str(error)) from None


def validate_generate(request: GenerateRequest, tokenizer: Tokenizer, settings: ServerSettings,
                      stream: bool) -> GenerateInputs:
    """TGI's `validate()`: the checks, their order and their messages."""
    p = request.parameters
    if p.best_of not in (None, 1) and settings.max_best_of == 1:
        raise validation_error("`best_of` != 1 is not allowed for this endpoint")
    check_limits(request, settings)
    check_limits(p, settings)
    sampling = bool(p.do_sample) or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    best_of = p.best_of if p.best_of is not None else 1
    if best_of != 1:
        if stream:
            raise validation_error("`best_of` != 1 is not supported when streaming tokens")
        if not sampling:
            raise validation_error("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise validation_error("`seed` must not be set when `best_of` > 1")
    if p.decoder_input_details and stream:
        raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
    temperature = 1.0 if p.temperature is None else p.temperature
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    top_p = 1.0 if p.top_p is None else p.top_p
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    stop = p.stop or []
    if any(not s for s in stop):
        raise validation_error("`stop` sequences must not be empty")
    top_n = p.top_n_tokens or 0
    guided = tgi_grammar(p.grammar, settings)
    lora = tgi_adapter(p.adapter_id, settings)
    token_ids = encode_inputs(tokenizer, request.inputs, p.truncate)
    max_new_tokens = check_lengths(len(token_ids), p.max_new_tokens, settings)
    params = sampling_params(
        n=best_of, best_of=best_of, temperature=temperature if sampling else 0.0,
        top_k=p.top_k or 0, top_p=top_p, typical_p=typical_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        seed=p.seed, stop=stop, include_stop_str_in_output=True,  # TGI keeps the stop text
        max_tokens=max_new_tokens, logprobs=top_n,
        prompt_logprobs=0 if p.decoder_input_details else None, skip_special_tokens=True,
        watermark=bool(p.watermark), watermark_gamma=settings.watermark_gamma,
        watermark_delta=settings.watermark_delta, **guided)
    return GenerateInputs(token_ids, params, top_n, bool(p.details or p.decoder_input_details),
                          bool(p.decoder_input_details), bool(p.return_full_text), lora)


def _not_loaded(what: str, settings: ServerSettings) -> APIError:
    loaded = ", ".join(f"`{name}`" for name in settings.lora_adapters) or "none"
    return validation_error(f"{what} is not loaded (the base model is `{settings.model_id}`; "
                            f"LoRA adapters: {loaded})")


def tgi_adapter(adapter_id: str | None, settings: ServerSettings) -> LoRARequest | None:
    """TGI's `adapter_id`: a loaded adapter's name, or the base model (none, or its id)."""
    if adapter_id is None or adapter_id == settings.model_id:
        return None
    if adapter_id in settings.lora_adapters:
        return LoRARequest(adapter_id)
    raise _not_loaded(f"adapter `{adapter_id}`", settings)


def openai_adapter(model: str | None, settings: ServerSettings) -> LoRARequest | None:
    """OpenAI's `model`: a loaded adapter's name, else the base model (its id or `tgi`; any name
    while no adapter is loaded, so that clients that send a placeholder keep working)."""
    if model in settings.lora_adapters:
        return LoRARequest(model)
    if not settings.lora_adapters or model in (None, settings.model_id, "tgi"):
        return None
    raise _not_loaded(f"model `{model}`", settings)


def token_id_key(key: str) -> int:
    """A `logit_bias` key: a token id written in ASCII digits (the engine checks the vocabulary)."""
    if not re.fullmatch(TOKEN_ID_KEY, key):
        shown = key if len(key) <= 20 else key[:20] + "..."
        raise validation_error(f"`logit_bias` keys must be token ids. Given: {shown!r}")
    return int(key)


# vLLM's request extras that this server does not implement, with the value that asks for
# nothing: any other value is refused by name rather than ignored.
VLLM_EXTRAS_REFUSED = {
    "use_beam_search": False, "length_penalty": 1.0, "early_stopping": False, "allowed_token_ids": None,
    "bad_words": None, "guided_choice": None, "guided_grammar": None, "truncate_prompt_tokens": None,
    "prompt_logprobs": None, "spaces_between_special_tokens": True, "add_special_tokens": None,
    "chat_template": None, "chat_template_kwargs": None, "continue_final_message": False,
    "add_generation_prompt": True, "documents": None, "return_tokens_as_token_ids": False,
    "logits_processors": None,
}


def refuse_unsupported_extras(body: ChatRequest | CompletionRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in VLLM_EXTRAS_REFUSED and value not in (None, VLLM_EXTRAS_REFUSED[name]):
            raise APIError(400, f"`{name}` is not supported by this server", "validation")


def openai_params(body: ChatRequest | CompletionRequest, num_input: int, settings: ServerSettings,
                  max_tokens: int | None, num_logprobs: int, best_of: int | None = None,
                  guided: dict | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """OpenAI's fields (and vLLM's sampling extras) -> SamplingParams; `temperature: 0` means
    greedy, as in OpenAI."""
    check_limits(body, settings)
    refuse_unsupported_extras(body)
    if body.guided_json is not None or body.guided_regex is not None:
        if guided:
            raise validation_error("`guided_json` and `guided_regex` cannot be combined with `response_format` "
                                   "or `tools`")
        guided = guided_json(body.guided_json, settings) if body.guided_json is not None \
            else guided_regex(body.guided_regex, settings)
    n = body.n or 1
    best_of = best_of or n
    if best_of < n:
        raise validation_error(f"`best_of` must be >= `n`. Given: {best_of} and {n}")
    temperature = 1.0 if body.temperature is None else body.temperature
    if best_of > 1 and temperature == 0:
        raise validation_error("you must use sampling (`temperature` > 0) when `n` or `best_of` is > 1")
    top_p = 1.0 if body.top_p is None else body.top_p
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise validation_error("`stop` sequences must not be empty")
    logit_bias = {}
    for key, bias in (body.logit_bias or {}).items():
        logit_bias[token_id_key(key)] = bias
        LOGIT_BIAS.check("logit_bias", bias, settings)
    max_new_tokens = check_lengths(num_input, max_tokens, settings)
    return sampling_params(
        n=n, best_of=best_of, temperature=temperature, top_p=top_p,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed, stop=stop, max_tokens=max_new_tokens, logprobs=num_logprobs,
        logit_bias=logit_bias, top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_tokens=body.min_tokens or 0, ignore_eos=body.ignore_eos, stop_token_ids=body.stop_token_ids,
        skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
        prompt_logprobs=prompt_logprobs, **(guided or {}))
