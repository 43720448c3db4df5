"""A request's outputs sent as what changed since its last one, from the engine's process to
the server's.

An output is cumulative: it carries all of a sequence's token ids, token texts and logprobs
so far. Pickled whole every step, a stream would cost the engine's process time that grows
with the square of its length. So the engine's side sends each list's new tail and the
server's side rebuilds the same outputs, each with fresh lists as the engine makes them.
The lists only grow, except that a stop string can drop the last tokens and the last token's
text can grow when its sequence ends (the rest of a character it ended inside); so each tail
starts one item before the end of what was sent, and the receiver cuts its copy there first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from server.outputs import CompletionOutput, RequestMetrics, RequestOutput


# Every delta is a plain tuple: several a step for every running request, pickled in the
# engine's process and unpickled in the server's, where a named tuple runs a Python
# constructor on both sides (more than the rest of the encoding) and a plain one runs none.

# (start, items): keep `start` items (characters, for a text) of what was sent before, then
# append `items`.
Tail = tuple[int, list | str]

# One completion's: (index, text: Tail, token_ids: Tail, token_texts: Tail, logprobs: Tail or
# None, cumulative_logprob, finish_reason, stop_reason, delta, seed).
CompletionDelta = tuple

# One request's: (request_id, prompt, prompt_logprobs: Tail or None, completions: a list of
# CompletionDelta, finished, seed, num_cached_tokens, metrics: RequestMetrics' fields or None,
# error). `prompt` is (the prompt, its token ids) in a request's first delta, else None.
OutputDelta = tuple


def delta_status(delta: OutputDelta) -> tuple[str, bool, str | None]:
    """A request's delta's request id, whether it finished, and the error that ended it."""
    return delta[0], delta[4], delta[8]


def tail(sent: int, items: list, length: int, offset: int = 0) -> Tail:
    """The tail of a list of `length` items, `items[offset:offset + length]` (copying only the
    tail), for a receiver that has `sent` of them: from one item before the end of those."""
    start = max(0, min(sent, length) - 1)
    return start, items[offset + start:offset + length]


def _apply(kept: list, tail: Tail) -> None:
    start, items = tail
    del kept[start:]
    kept.extend(items)


@dataclass
class SentCompletion:
    """How much of one completion the server's side has."""

    text: str = ""  # OutputEncoder's: the text sent (the engine's own deltas count Sequence.emitted_text_len)
    token_ids: int = 0
    token_texts: int = 0
    logprobs: int = 0

    def tails(self, token_ids: list[int], num_ids: int, token_texts: list[str], num_texts: int,
              logprobs: list | None, offset: int = 0) -> tuple[Tail, Tail, Tail | None]:
        """The new tails of a completion's `num_ids` token ids (from `offset` in `token_ids`),
        `num_texts` texts and its logprobs (None: not asked for), counted as sent."""
        ids, texts = tail(self.token_ids, token_ids, num_ids, offset), tail(self.token_texts, token_texts, num_texts)
        self.token_ids, self.token_texts = num_ids, num_texts
        if logprobs is None:
            return ids, texts, None
        new_logprobs = tail(self.logprobs, logprobs, len(logprobs))
        self.logprobs = len(logprobs)
        return ids, texts, new_logprobs


@dataclass
class _SentRequest:
    prompt_logprobs: int = 0
    completions: dict[int, SentCompletion] = field(default_factory=dict)


class OutputEncoder:
    """The engine process's side: what each running request's outputs have sent so far."""

    def __init__(self):
        self._sent: dict[str, _SentRequest] = {}

    def encode(self, output: RequestOutput) -> OutputDelta:
        sent, first = self.sent(output.request_id)
        prompt_logprobs = None
        if output.prompt_logprobs is not None:
            prompt_logprobs = tail(sent.prompt_logprobs, output.prompt_logprobs, len(output.prompt_logprobs))
            sent.prompt_logprobs = len(output.prompt_logprobs)
        completions = [self._completion(sent.completions.setdefault(c.index, SentCompletion()), c) for c in output.outputs]
        if output.finished:
            del self._sent[output.request_id]
        metrics = output.metrics
        return (output.request_id, (output.prompt, output.prompt_token_ids) if first else None, prompt_logprobs,
                completions, output.finished, output.seed, output.num_cached_tokens,
                None if metrics is None else (metrics.arrival_time, metrics.first_scheduled_time,
                                              metrics.first_token_time, metrics.finished_time),
                output.error)

    def sent(self, request_id: str) -> tuple[_SentRequest, bool]:
        """What a request has sent so far, and whether this is its first delta."""
        sent = self._sent.get(request_id)
        if sent is None:
            sent = self._sent[request_id] = _SentRequest()
            return sent, True
        return sent, False

    def forget(self, request_id: str) -> None:
        """The request ended without a finished output (aborted)."""
        self._sent.pop(request_id, None)

    @staticmethod
    def _completion(sent: SentCompletion, completion: CompletionOutput) -> CompletionDelta:
        text = completion.text
        text_start = len(sent.text) if text.startswith(sent.text) else 0
        sent.text = text
        token_ids, token_texts, logprobs = sent.tails(completion.token_ids, len(completion.token_ids),
                                                      completion.token_texts, len(completion.token_texts),
                                                      completion.logprobs)
        return (completion.index, (text_start, text[text_start:]), token_ids, token_texts, logprobs,
                completion.cumulative_logprob, completion.finish_reason, completion.stop_reason, completion.delta,
                completion.seed)


@dataclass
class _Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)


class OutputRebuilder:
    """The server process's side, one a request: its outputs rebuilt from their deltas."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []
        self.prompt_logprobs: list[dict[int, float] | None] = []
        self.completions: dict[int, _Completion] = {}

    def rebuild(self, deltas: list[OutputDelta]) -> RequestOutput:
        """The output after `deltas`, which came one after another (a reader that fell behind
        takes several at once): as the last delta's output, but with each sequence's `delta`
        text joining all of theirs."""
        texts: dict[int, str] = {}
        with_prompt_logprobs = False
        for _, prompt, prompt_logprobs, completions, *_ in deltas:
            if prompt is not None:
                self.prompt, self.prompt_token_ids = prompt
            if prompt_logprobs is not None:
                _apply(self.prompt_logprobs, prompt_logprobs)
                with_prompt_logprobs = True
            for index, text, token_ids, token_texts, logprobs, *_, delta, _ in completions:
                kept = self.completions.get(index)
                if kept is None:
                    kept = self.completions[index] = _Completion()
                kept.text = kept.text[:text[0]] + text[1]
                _apply(kept.token_ids, token_ids)
                _apply(kept.token_texts, token_texts)
                if logprobs is not None:
                    _apply(kept.logprobs, logprobs)
                texts[index] = texts.get(index, "") + delta
        _, _, _, completions, finished, seed, num_cached_tokens, metrics, error = deltas[-1]
        outputs = []
        for index, _, _, _, logprobs, cumulative_logprob, finish_reason, stop_reason, _, completion_seed in completions:
            kept = self.completions[index]
            outputs.append(CompletionOutput(
                index=index, text=kept.text, token_ids=list(kept.token_ids), cumulative_logprob=cumulative_logprob,
                logprobs=None if logprobs is None else list(kept.logprobs), finish_reason=finish_reason,
                stop_reason=stop_reason, delta=texts[index], seed=completion_seed,
                token_texts=list(kept.token_texts)))
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if with_prompt_logprobs else None, outputs=outputs,
            finished=finished, seed=seed, num_cached_tokens=num_cached_tokens,
            metrics=None if metrics is None else RequestMetrics(*metrics), error=error)
