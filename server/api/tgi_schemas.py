"""TGI's request and response bodies (`router/src/lib.rs`), field for field."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


# Stop strings, alone or in a list, are never empty (the validators refuse them).
NON_EMPTY_STRINGS = {"minLength": 1, "items": {"minLength": 1}}


class Grammar(BaseModel):
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any


class GenerateParameters(BaseModel):
    adapter_id: str | None = None
    best_of: int | None = Field(None, description="Generate best_of sequences and return the one "
                                "with the highest log probability; the others are in `best_of_sequences`.")
    decoder_input_details: bool | None = Field(False, description="Return the prompt tokens with their logprobs.")
    details: bool | None = Field(False, description="Return the tokens, their logprobs and the finish reason.")
    do_sample: bool | None = Field(False, description="Sample instead of picking the most likely token.")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]: penalise tokens by how often they "
                                            "already appear in the output.")
    grammar: Grammar | None = None
    max_new_tokens: int | None = Field(None, description="Most tokens to generate; null means up to "
                                       "`max_total_tokens` less the input.")
    repetition_penalty: float | None = Field(None, description="> 0; 1.0 means no penalty.")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to the generated text.")
    seed: int | None = None
    stop: list[str] | None = Field(None, json_schema_extra=NON_EMPTY_STRINGS, description="Stop before generating past any of these strings; "
                                   "the matched text is kept.")
    temperature: float | None = Field(None, description="> 0; the value used to modulate the logits.")
    top_k: int | None = None
    top_n_tokens: int | None = Field(None, description="Also return the n most likely tokens at each step.")
    top_p: float | None = None
    truncate: int | None = Field(None, description="Keep only the last `truncate` input tokens.")
    typical_p: float | None = None
    watermark: bool | None = Field(False, description="Watermark the output (Kirchenbauer et al. 2023).")


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=lambda: GenerateParameters(do_sample=True))
    stream: bool = False  # read by `POST /` only


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class SequenceDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(SequenceDetails):
    generated_text: str


class Details(SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None
    details: StreamDetails | None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    model_dtype: str
    model_device_type: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    lora_adapters: list[str] = []


class ErrorResponse(BaseModel):
    error: str
    error_type: str
