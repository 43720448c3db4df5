"""What the engine returns: vLLM's output shapes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One sampled sequence. `text` is cumulative and only ever grows while streaming;
    `delta` is the text added since the previous output of the same request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop", "length" or "abort"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    delta: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    seed: int | None = None
    num_cached_tokens: int = 0
