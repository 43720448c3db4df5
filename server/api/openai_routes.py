"""OpenAI's routes: `/v1/chat/completions`, `/v1/completions` and `/v1/models`."""
from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Request

from server.api import tool_calls
from server.api.errors import APIError, client_message, validation_error
from server.api.generation import Generation, SequenceResult, TokenInfo
from server.api.guided import check_grammar, guided_json, response_format
from server.api.openai_schemas import (ChatCompletion, ChatRequest, Completion, CompletionRequest,
                                       ModelList)
from server.api.state import RequestTrace, ServerState
from server.api.streaming import EventStream, merge, openai_chunks, openai_event, until_disconnected
from server.api.tgi_schemas import ErrorResponse
from server.api.tools import ToolUse, tool_error, tool_use, with_tool_prompt
from server.api.validation import openai_adapter, openai_params
from server.engine.detokenizer import IncrementalDetokenizer

ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 422, 424, 429)}
# Streams answer with server-sent events; the JSON schema of each event is the route's model.
STREAMED = {**ERRORS, 200: {"description": "JSON, or server-sent events when streaming",
                            "content": {"text/event-stream": {"schema": {
                                "type": "object", "properties": {"data": {"type": "string"}}}}}}}


def finish_reason(seq: SequenceResult) -> str | None:
    if seq.finish_reason is None:
        return None
    return "length" if seq.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def ending_with_done(events: AsyncIterator[str], trace: RequestTrace) -> AsyncIterator[str]:
    """An OpenAI stream: an error after the stream began is its last event, then `[DONE]`."""
    try:
        async for event in events:
            yield event
    except Exception as error:
        trace.failed(error)
        yield error_event(error)
    except BaseException as error:  # the client left: its request was aborted on the way out
        trace.failed(error)
        raise
    yield openai_event("[DONE]")


def error_event(error: Exception) -> str:
    if not isinstance(error, APIError):
        error = APIError(500, f"Incomplete generation: {client_message(error)}", "incomplete_generation")
    return openai_event({"error": {"message": error.message, "type": error.error_type,
                                   "http_status_code": error.status_code}})


class OpenAIRoutes:
    def __init__(self, state: ServerState):
        self.state = state
        self.tokenizer = state.engine.tokenizer
        self.fingerprint = f"{state.settings.version}-native"

    # -- chat ---------------------------------------------------------------------------
    def prepare_chat(self, body: ChatRequest) -> tuple[Generation, ToolUse | None]:
        settings = self.state.settings
        if body.tools and (body.response_format or {}).get("type", "text") != "text":
            raise tool_error("Grammar and tools are mutually exclusive")
        guided = response_format(body.response_format, settings)
        # `content` stays (null too): templates read it, and a tool call's turn has none.
        messages = [{**m.model_dump(exclude_none=True), "content": m.model_dump(include={"content"})["content"]}
                    for m in body.messages]
        use = tool_use(body.tools, body.tool_choice)
        if use is not None:
            guided = guided_json(use.schema, settings)
            messages = with_tool_prompt(messages, use, body.tool_prompt, self.tokenizer.takes_tools)
        try:
            token_ids = self.tokenizer.apply_chat_template(messages, tools=use.tools if use else None)
        except ValueError as error:
            raise APIError(422, client_message(error), "template_error") from error
        top = (body.top_logprobs or 0) if body.logprobs else 0
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = openai_params(body, len(token_ids), settings, max_tokens, top, guided=guided)
        check_grammar(self.state.engine, params)
        return Generation(self.state.engine, token_ids, params, top, openai_adapter(body.model, settings)), use

    def token_logprob(self, token: TokenInfo, top: list[TokenInfo]) -> dict:
        text = self.tokenizer.token_text(token.id)
        return {"token": text, "logprob": token.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                                 for t in top]}

    def chat_choice(self, body: ChatRequest, use: ToolUse | None, seq: SequenceResult) -> dict:
        message, reason = {"role": "assistant", "content": seq.text}, finish_reason(seq)
        if use is not None:
            message, reader = tool_calls.reply_message(seq.text)
            reason = tool_calls.finish_reason(reader, reason)
        logprobs = {"content": [self.token_logprob(t, top) for t, top in zip(seq.tokens, seq.top_tokens)]} \
            if body.logprobs else None
        return {"index": seq.index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def chat_response(self, body: ChatRequest, generation: Generation, use: ToolUse | None,
                      results: list[SequenceResult]) -> dict:
        choices = [self.chat_choice(body, use, seq) for seq in results]
        return {"id": f"chatcmpl-{generation.request_id}", "object": "chat.completion",
                "created": int(time.time()), "model": self.state.settings.model_id,
                "system_fingerprint": self.fingerprint, "choices": choices,
                "usage": usage(len(generation.token_ids), sum(len(s.tokens) for s in results))}

    async def chat_events(self, body: ChatRequest, generation: Generation, use: ToolUse | None,
                          trace: RequestTrace) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": f"chatcmpl-{generation.request_id}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.state.settings.model_id,
                "system_fingerprint": self.fingerprint}

        chunk = openai_chunks(base, include_usage)

        n = generation.params.n
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": "", "tool_calls": None},
                      "logprobs": None, "finish_reason": None} for i in range(n)])
        readers = {i: tool_calls.ToolCallReader() for i in range(n)} if use is not None else {}
        async for steps in generation.steps():
            for step in steps:
                seq = step.sequence
                logprobs = None
                if body.logprobs:
                    logprobs = {"content": [self.token_logprob(t, top)
                                            for t, top in zip(step.tokens, step.top_tokens)]}
                delta, reason = ({"content": step.delta} if step.delta else {}), finish_reason(seq)
                if use is not None:
                    reader = readers[seq.index]
                    delta = tool_calls.stream_delta(reader, seq.text, step.finished)
                    reason = tool_calls.finish_reason(reader, reason)
                if delta or logprobs or step.finished:
                    # The role in every chunk, as TGI sends it, and `tool_calls` (null in text): the
                    # text-generation client reads both from each.
                    yield chunk([{"index": seq.index, "delta": {"role": "assistant", "tool_calls": None, **delta},
                                  "logprobs": logprobs, "finish_reason": reason}])
        results = generation.results()
        trace.succeeded(generation, results)
        if include_usage:
            yield openai_event({**base, "choices": [], "usage": usage(len(generation.token_ids),
                                                                     sum(len(s.tokens) for s in results))})

    # -- completions ----------------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> list[Generation]:
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise validation_error("`prompt` cannot be empty")
        if len(prompts) > self.state.settings.max_client_batch_size:
            raise validation_error(f"Number of prompts must be <= {self.state.settings.max_client_batch_size}. "
                                   f"Given: {len(prompts)}")
        vocab = self.tokenizer.vocab_size
        generations = []
        lora = openai_adapter(body.model, self.state.settings)
        for prompt in prompts:
            if isinstance(prompt, str):
                if not prompt:
                    raise validation_error("`prompt` cannot be empty")
                token_ids = self.tokenizer.encode(prompt)
            else:
                token_ids = list(prompt)
                if not token_ids or any(not 0 <= t < vocab for t in token_ids):
                    raise validation_error(f"prompt token ids must be in [0, {vocab}) and not empty")
            top = body.logprobs or 0
            # With `echo`, the prompt's tokens are scored too (lm-evaluation-harness reads a
            # continuation's logprobs back from the prompt this way).
            scored = top if body.echo and body.logprobs is not None else None
            params = openai_params(body, len(token_ids), self.state.settings, body.max_tokens, top,
                                   best_of=body.best_of, prompt_logprobs=scored)
            check_grammar(self.state.engine, params)
            generations.append(Generation(self.state.engine, token_ids, params, top, lora))
        return generations

    def completion_logprobs(self, seq: SequenceResult, offset: int) -> dict:
        texts = [self.tokenizer.token_text(t.id) for t in seq.tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in seq.tokens],
                "top_logprobs": [{t.text: t.logprob for t in top} for top in seq.top_tokens],
                "text_offset": offsets}

    def echo(self, generation: Generation, with_logprobs: bool) -> tuple[str, dict | None]:
        """The prompt as echoed, and its logprobs as OpenAI's legacy completions give them: each
        token's logprob given the tokens before it (None for the first, which nothing precedes),
        the top alternatives, and where the token's text starts in the echoed text."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, [])
        entries = generation.prompt_logprobs or []
        tokens, logprobs, tops, offsets = [], [], [], []
        for position, token_id in enumerate(generation.token_ids):
            entry = entries[position] if position < len(entries) else None
            tokens.append(self.tokenizer.token_text(token_id))
            logprobs.append(entry.get(token_id) if entry else None)
            tops.append({t.text: t.logprob for t in generation.top_tokens(entry)} if entry else None)
            offsets.append(len(detokenizer.text))
            detokenizer.add(token_id)
        detokenizer.flush()
        if not with_logprobs:
            return detokenizer.text, None
        return detokenizer.text, {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def completion_choice(self, body: CompletionRequest, generation: Generation, position: int,
                          seq: SequenceResult) -> dict:
        prefix, logprobs = self.echo(generation, body.logprobs is not None) if body.echo else ("", None)
        if body.logprobs is not None:
            generated = self.completion_logprobs(seq, len(prefix))
            logprobs = generated if logprobs is None else {key: logprobs[key] + generated[key] for key in generated}
        return {"index": position * generation.params.n + seq.index, "text": prefix + seq.text,
                "logprobs": logprobs, "finish_reason": finish_reason(seq)}

    async def completion_events(self, body: CompletionRequest, generations: list[Generation],
                                trace: RequestTrace) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": f"cmpl-{generations[0].request_id}", "object": "text_completion",
                "created": int(time.time()), "model": self.state.settings.model_id,
                "system_fingerprint": self.fingerprint}
        echoed, chunk = set(), openai_chunks(base)
        async for position, steps in merge([g.steps() for g in generations]):
            generation = generations[position]
            if body.echo and position not in echoed:  # once its prompt is scored: at its first output
                echoed.add(position)
                text, logprobs = self.echo(generation, body.logprobs is not None)
                for i in range(generation.params.n):
                    yield chunk([{"index": position * generation.params.n + i, "text": text,
                                  "logprobs": logprobs, "finish_reason": None}])
            for step in steps:
                if not step.delta and not step.finished:
                    continue
                logprobs = None
                if body.logprobs is not None:
                    partial = SequenceResult(step.sequence.index, tokens=step.tokens, top_tokens=step.top_tokens)
                    logprobs = self.completion_logprobs(partial, 0)
                yield chunk([{"index": position * generation.params.n + step.sequence.index, "text": step.delta,
                              "logprobs": logprobs, "finish_reason": finish_reason(step.sequence)}])
        results = [r for g in generations for r in g.results()]
        for generation in generations:
            trace.succeeded(generation, generation.results())
        if include_usage:
            yield openai_event({**base, "choices": [], "usage": usage(
                sum(len(g.token_ids) for g in generations), sum(len(s.tokens) for s in results))})

    async def run_completions(self, generations: list[Generation]) -> list[list[SequenceResult]]:
        results = []
        async for position, _ in merge([g.steps() for g in generations]):
            pass
        for generation in generations:
            results.append(generation.results())
        return results

    def completion_response(self, body: CompletionRequest, generations: list[Generation],
                            results: list[list[SequenceResult]]) -> dict:
        choices = [self.completion_choice(body, g, position, seq)
                   for position, (g, seqs) in enumerate(zip(generations, results)) for seq in seqs]
        return {"id": f"cmpl-{generations[0].request_id}", "object": "text_completion",
                "created": int(time.time()), "model": self.state.settings.model_id,
                "system_fingerprint": self.fingerprint, "choices": choices,
                "usage": usage(sum(len(g.token_ids) for g in generations),
                               sum(len(s.tokens) for seqs in results for s in seqs))}

    # -- handlers -------------------------------------------------------------------------
    async def _serve(self, route: str, streaming: bool, prepare, events, complete):
        """Admission, validation, then a stream (which releases its slot when it closes) or a
        complete answer; every outcome reaches the request's trace."""
        release, stream = self.state.acquire(), None
        trace = RequestTrace(self.state, route)
        try:
            work = prepare()
            trace.validated()
            if streaming:
                stream = EventStream(ending_with_done(events(work, trace), trace), on_close=release)
                return stream
            return await complete(work, trace)
        except BaseException as error:
            trace.failed(error)
            raise
        finally:
            if stream is None:
                release()

    async def chat(self, body: ChatRequest, request: Request):
        async def complete(work: tuple[Generation, ToolUse | None], trace: RequestTrace) -> dict:
            generation, use = work
            results = await until_disconnected(request, generation.run())
            trace.succeeded(generation, results)
            return self.chat_response(body, generation, use, results)

        return await self._serve("/v1/chat/completions", body.stream, lambda: self.prepare_chat(body),
                                 lambda work, trace: self.chat_events(body, *work, trace), complete)

    async def completions(self, body: CompletionRequest, request: Request):
        async def complete(generations: list[Generation], trace: RequestTrace) -> dict:
            results = await until_disconnected(request, self.run_completions(generations))
            for generation, seqs in zip(generations, results):
                trace.succeeded(generation, seqs)
            return self.completion_response(body, generations, results)

        return await self._serve("/v1/completions", body.stream, lambda: self.prepare_completion(body),
                                 lambda gs, trace: self.completion_events(body, gs, trace), complete)

    async def models(self):
        """The base model, then each LoRA adapter (vLLM's `parent` names what it adapts)."""
        model_id = self.state.settings.model_id
        base = {"id": model_id, "object": "model", "created": 0, "owned_by": model_id, "parent": None}
        return {"object": "list", "data": [base] + [{**base, "id": name, "parent": model_id}
                                                    for name in self.state.settings.lora_adapters]}

    def router(self) -> APIRouter:
        router = APIRouter(tags=["OpenAI"])
        router.add_api_route("/v1/chat/completions", self.chat, methods=["POST"], response_model=ChatCompletion,
                             responses=STREAMED, summary="OpenAI chat completions (plain or streamed)")
        router.add_api_route("/v1/completions", self.completions, methods=["POST"], response_model=Completion,
                             responses=STREAMED, summary="OpenAI completions (plain or streamed)")
        router.add_api_route("/v1/models", self.models, methods=["GET"], response_model=ModelList,
                             summary="The served model")
        return router
