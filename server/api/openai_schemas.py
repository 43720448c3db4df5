"""OpenAI's chat and completion bodies, as TGI and vLLM accept them."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from server.api.limits import LOGIT_BIAS, TOKEN_ID_KEY
from server.api.tgi_schemas import NON_EMPTY_STRINGS


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id ... reach the template
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class SamplingFields(BaseModel):
    """The fields chat and completions share: OpenAI's, and the sampling extras vLLM accepts
    beside them (server/api/validation.py refuses vLLM's other extras by name)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="Accepted for compatibility; the server serves one model.")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = Field(None, json_schema_extra=NON_EMPTY_STRINGS)
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={
        "propertyNames": {"pattern": TOKEN_ID_KEY}, "additionalProperties": LOGIT_BIAS.schema(None)},
        description="Token ids (as strings) -> a bias in [-100, 100] added to their logits.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, description="vLLM's: keep the k most likely tokens; 0 or -1 keeps all.")
    min_p: float | None = Field(None, description="vLLM's: drop tokens less likely than min_p times the likeliest.")
    repetition_penalty: float | None = Field(None, description="vLLM's: > 1 penalises tokens already seen.")
    min_tokens: int | None = Field(None, description="vLLM's: generate at least this many tokens before EOS "
                                   "or a stop token may end the output.")
    ignore_eos: bool = Field(False, description="vLLM's: go on past EOS (to exactly max_tokens).")
    stop_token_ids: list[int] | None = Field(None, description="vLLM's: token ids that end the output.")
    skip_special_tokens: bool = Field(True, description="vLLM's: leave special tokens out of the text.")
    include_stop_str_in_output: bool = Field(False, description="vLLM's: keep the matched stop string.")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: a JSON schema the output follows.")
    guided_regex: str | None = Field(None, json_schema_extra={"minLength": 1},
                                     description="vLLM's: a regex the output matches.")


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = Field(None, description='"auto" (the default with tools), "none", "required", or the '
                             'function to call: {"type": "function", "function": {"name": ...}} or its name.')
    tool_prompt: str | None = Field(None, description="Written after the last message when tools are offered "
                                    "(TGI's); by default, TGI's own.")
    response_format: dict[str, Any] | None = Field(None, description='{"type": "text" | "json_object"}, or '
                                                   '{"type": "json_schema", "json_schema": {"name", "schema"}}.')


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = Field(None, description="Not supported: refused unless empty.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object's text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None  # what a LoRA adapter adapts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
