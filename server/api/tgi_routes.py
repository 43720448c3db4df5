"""TGI's own routes: `/generate`, `/generate_stream`, `POST /` and `/tokenize`."""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Request, Response

from server.api.errors import APIError, client_message
from server.api.generation import Generation, SequenceResult, TokenInfo
from server.api.guided import check_grammar
from server.api.state import RequestTrace, ServerState
from server.api.streaming import EventStream, tgi_event, until_disconnected
from server.api.tgi_schemas import (ErrorResponse, GenerateRequest, GenerateResponse, SimpleToken,
                                    StreamResponse)
from server.api.validation import validate_generate

ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 422, 424, 429)}
# Streams answer with server-sent events; the JSON schema of each event is the route's model.
STREAMED = {**ERRORS, 200: {"description": "JSON, or server-sent events when streaming",
                            "content": {"text/event-stream": {"schema": {
                                "type": "object", "properties": {"data": {"type": "string"}}}}}}}


def token_json(token: TokenInfo) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def _sequence_details(seq: SequenceResult, prefill: list[TokenInfo], greedy: bool) -> dict:
    details = {
        "finish_reason": seq.tgi_finish_reason,
        "generated_tokens": len(seq.tokens),
        "seed": None if greedy else seq.seed,
        "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in prefill],
        "tokens": [token_json(t) for t in seq.tokens],
    }
    if any(seq.top_tokens):
        details["top_tokens"] = [[token_json(t) for t in top] for top in seq.top_tokens]
    return details


def generate_response(generation: Generation, results: list[SequenceResult], details: bool,
                      prefix: str) -> dict:
    """The best sequence is the answer; with best_of > 1 the others go in `best_of_sequences`."""
    ranked = sorted(results, key=lambda s: s.cumulative_logprob, reverse=True)
    best = ranked[0]
    body: dict = {"generated_text": prefix + best.text}
    if details:
        prefill = generation.prefill_tokens()
        greedy = generation.params.greedy
        body["details"] = _sequence_details(best, prefill, greedy)
        if len(ranked) > 1:
            body["details"]["best_of_sequences"] = [
                {"generated_text": prefix + s.text, **_sequence_details(s, prefill, greedy)}
                for s in ranked[1:]]
    return body


class TGIRoutes:
    def __init__(self, state: ServerState):
        self.state = state
        self.tokenizer = state.engine.tokenizer

    def prepare(self, body: GenerateRequest, trace: RequestTrace, stream: bool):
        inputs = validate_generate(body, self.tokenizer, self.state.settings, stream)
        check_grammar(self.state.engine, inputs.params)
        trace.validated()
        generation = Generation(self.state.engine, inputs.token_ids, inputs.params, inputs.top_n_tokens, inputs.lora)
        prefix = body.inputs if inputs.return_full_text else ""
        return inputs, generation, prefix

    async def generate_json(self, body: GenerateRequest, request: Request, response: Response,
                            route: str) -> dict:
        with self.state.admission():
            trace = RequestTrace(self.state, route)
            try:
                inputs, generation, prefix = self.prepare(body, trace, stream=False)
                results = await until_disconnected(request, generation.run())
                response.headers.update(trace.succeeded(generation, results))
            except BaseException as error:
                trace.failed(error)
                raise
        return generate_response(generation, results, inputs.details, prefix)

    def generate_events(self, body: GenerateRequest, route: str) -> EventStream:
        """Errors found before the stream starts are answered with their status code; after
        it starts, as a last event `{"error", "error_type"}` (TGI's way)."""
        release = self.state.acquire()
        trace = RequestTrace(self.state, route)
        try:
            inputs, generation, prefix = self.prepare(body, trace, stream=True)
        except BaseException as error:
            trace.failed(error)
            release()
            raise

        async def events() -> AsyncIterator[str]:
            index = 0
            try:
                async for steps in generation.steps():
                    events = []  # one event a token, all of an output's sent at once
                    for step in steps:
                        for position, token in enumerate(step.tokens):
                            index += 1
                            last = step.finished and position == len(step.tokens) - 1
                            event = {"index": index, "token": token_json(token)}
                            if step.top_tokens[position]:
                                event["top_tokens"] = [token_json(t) for t in step.top_tokens[position]]
                            event["generated_text"] = prefix + step.sequence.text if last else None
                            event["details"] = _stream_details(generation, step.sequence) \
                                if last and inputs.details else None
                            events.append(tgi_event(event))
                    if events:
                        yield "".join(events)
                trace.succeeded(generation, generation.results())
            except APIError as error:
                trace.failed(error)
                yield tgi_event(error.body())
            except Exception as error:  # never a broken stream without a word
                trace.failed(error)
                yield tgi_event({"error": f"Incomplete generation: {client_message(error)}",
                                 "error_type": "incomplete_generation_stream"})
            except BaseException as error:
                trace.failed(error)
                raise

        return EventStream(events(), on_close=release)

    async def generate(self, body: GenerateRequest, request: Request, response: Response):
        return await self.generate_json(body, request, response, "/generate")

    async def generate_stream(self, body: GenerateRequest):
        return self.generate_events(body, "/generate_stream")

    async def compat_generate(self, body: GenerateRequest, request: Request, response: Response):
        if body.stream:
            return self.generate_events(body, "/")
        return [await self.generate_json(body, request, response, "/")]

    async def tokenize(self, body: GenerateRequest):
        return [{"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
                for i, start, stop in self.tokenizer.encode_with_offsets(body.inputs)]

    def router(self) -> APIRouter:
        router = APIRouter(tags=["Text Generation Inference"])
        router.add_api_route("/generate", self.generate, methods=["POST"], response_model=GenerateResponse,
                             response_model_exclude_unset=True, responses=ERRORS, summary="Generate tokens")
        router.add_api_route("/generate_stream", self.generate_stream, methods=["POST"],
                             response_model=StreamResponse, responses=STREAMED,
                             summary="Generate a stream of token events (server-sent events)")
        router.add_api_route("/", self.compat_generate, methods=["POST"], response_model=list[GenerateResponse],
                             response_model_exclude_unset=True, responses=STREAMED,
                             summary="Generate tokens; with `stream: true` a stream of events")
        router.add_api_route("/tokenize", self.tokenize, methods=["POST"], response_model=list[SimpleToken],
                             responses=ERRORS, summary="Tokenize the inputs")
        return router


def _stream_details(generation: Generation, seq: SequenceResult) -> dict:
    return {"finish_reason": seq.tgi_finish_reason, "generated_tokens": len(seq.tokens),
            "seed": None if generation.params.greedy else seq.seed,
            "input_length": len(generation.token_ids)}
