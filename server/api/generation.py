"""One engine request seen token by token, the way both APIs report it.

The engine streams `RequestOutput`s whose text grows by `delta`; TGI and OpenAI speak of
tokens, each with its text, logprob and alternatives. `Generation` turns the one into the
other. The text of a token is the text it added to the output (the engine's `token_texts`),
whether or not a stop string holds that text back from the stream for a while, so the texts
of a stream join to the generated text; a special token (EOS) also shows its own text ("</s>")
as TGI's do.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from server.api.errors import client_message, generation_error, validation_error
from server.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from server.outputs import RequestMetrics, RequestOutput
from server.sampling_params import LoRARequest, SamplingParams


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass
class SequenceResult:
    """Everything one sampled sequence produced so far."""

    index: int
    seed: int | None = None
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    finish_reason: str | None = None  # the engine's: "stop", "length" or "abort"
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0

    @property
    def tgi_finish_reason(self) -> str:
        if self.finish_reason == "length":
            return "length"
        return "stop_sequence" if isinstance(self.stop_reason, str) else "eos_token"


@dataclass
class Step:
    """What one engine output added to one sequence."""

    sequence: SequenceResult
    tokens: list[TokenInfo]
    top_tokens: list[list[TokenInfo]]
    delta: str

    @property
    def finished(self) -> bool:
        return self.sequence.finish_reason is not None


class Generation:
    def __init__(self, engine: AsyncEngine, token_ids: list[int], params: SamplingParams,
                 top_n: int = 0, lora: LoRARequest | None = None):
        self.engine = engine
        self.lora = lora
        self.tokenizer = engine.tokenizer
        self.token_ids = token_ids
        self.params = params
        self.top_n = top_n
        self.request_id = uuid.uuid4().hex
        self.sequences: dict[int, SequenceResult] = {}
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.seed: int | None = None
        self.metrics: RequestMetrics | None = None

    async def steps(self) -> AsyncIterator[list[Step]]:
        """Yield the new tokens of each engine output; leaving early aborts the request."""
        try:
            async for output in self.engine.generate(self.token_ids, self.params, self.request_id, self.lora):
                yield self._advance(output)
        except ValueError as error:  # the engine refused the input
            raise validation_error(client_message(error)) from error
        except (EngineStepError, EngineDeadError) as error:
            raise generation_error(client_message(error)) from error

    async def run(self) -> list[SequenceResult]:
        async for _ in self.steps():
            pass
        return self.results()

    def results(self) -> list[SequenceResult]:
        return [self.sequences[i] for i in sorted(self.sequences)]

    def _advance(self, output: RequestOutput) -> list[Step]:
        self.seed = output.seed
        self.metrics = output.metrics
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        steps = []
        is_special = self.tokenizer.is_special
        for completion in output.outputs:
            seq = self.sequences.get(completion.index)
            if seq is None:
                seq = self.sequences[completion.index] = SequenceResult(completion.index)
            seq.seed = completion.seed
            tokens, tops = [], []
            logprobs, texts = completion.logprobs, completion.token_texts
            for position in range(len(seq.tokens), len(completion.token_ids)):
                token_id = completion.token_ids[position]
                text = texts[position] if position < len(texts) else ""
                special = is_special(token_id)
                if special:
                    text += self.tokenizer.token_text(token_id)
                if logprobs:
                    tokens.append(TokenInfo(token_id, text, logprobs[position].get(token_id), special))
                    tops.append(self.top_tokens(logprobs[position]))
                else:
                    tokens.append(TokenInfo(token_id, text, None, special))
                    tops.append([])
            seq.tokens.extend(tokens)
            seq.top_tokens.extend(tops)
            seq.text = completion.text
            seq.finish_reason = completion.finish_reason
            seq.stop_reason = completion.stop_reason
            seq.cumulative_logprob = completion.cumulative_logprob
            if tokens or completion.delta or completion.finished:
                steps.append(Step(seq, tokens, tops, completion.delta))
        return steps

    def top_tokens(self, logprobs: dict[int, float]) -> list[TokenInfo]:
        """The `top_n` most likely tokens of one step (the dict also holds the sampled one)."""
        if not self.top_n:
            return []
        best = sorted(logprobs.items(), key=lambda item: item[1], reverse=True)[:self.top_n]
        return [TokenInfo(i, self.tokenizer.token_text(i), lp, self.tokenizer.is_special(i))
                for i, lp in best]

    def prefill_tokens(self) -> list[TokenInfo]:
        """The prompt's tokens with the logprob of each given what precedes it (none for the first)."""
        if self.prompt_logprobs is None:
            return []
        out = []
        for position, token_id in enumerate(self.token_ids):
            entry = self.prompt_logprobs[position] if position < len(self.prompt_logprobs) else None
            logprob = entry.get(token_id) if entry else None
            out.append(TokenInfo(token_id, self.tokenizer.token_text(token_id), logprob))
        return out

