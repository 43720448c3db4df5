"""The engine for servers: an asyncio front over one engine thread.

The engine's state is touched by its own thread only. Callers post commands (add, abort) to
a thread-safe queue and receive outputs on a per-request asyncio queue, fed with
`call_soon_threadsafe` (once a step for all of a loop's outputs), so the event loop never
waits for a model step. The thread shares the process's GIL with the event loop, though;
`ProcessEngine` (engine_process.py) answers to the same interface with the engine in a
process of its own.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

from server.config import EngineArgs, EngineConfig
from server.engine.llm_engine import LLMEngine
from server.outputs import RequestOutput
from server.sampling_params import LoRARequest, SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """A model step failed with this request's work; the request was ended."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served any more."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health, read without stopping the engine thread."""

    num_waiting: int  # sequences queued for admission
    num_running: int  # sequences in the running batch
    num_free_blocks: int
    num_blocks: int


def engine_stats(engine: LLMEngine) -> EngineStats:
    scheduler, blocks = engine.scheduler, engine.block_manager
    return EngineStats(len(scheduler.waiting), len(scheduler.running), blocks.num_free_blocks, blocks.num_blocks)


class AsyncEngine:
    def __init__(self, args: EngineArgs | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(args or EngineArgs())
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self.dead_error}")
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        stream: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", (prompt, params, request_id, lora_request, loop, stream, accepted)))
        request_id = await accepted
        async with aclosing(stream_outputs(stream, lambda: self.abort(request_id))) as outputs:
            async for output in outputs:
                yield output

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def lora_adapters(self) -> list[str]:
        """The LoRA adapters' names, in the order they were loaded."""
        return list(self.engine.lora_adapters)

    @property
    def guidance(self):
        return self.engine.guidance

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def stats(self) -> EngineStats:
        return engine_stats(self.engine)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # -- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                block = not self.engine.has_unfinished_requests()
                self._run_commands(block)
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as error:  # a bug in the loop itself: say so, never hang callers
            logger.exception("engine loop died")
            self.dead_error = error
            dead = EngineDeadError(f"the engine has stopped: {error}")
            self._fail_all(dead)
            self._refuse_queued_adds(dead)

    def _refuse_queued_adds(self, error: EngineDeadError) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                *_, loop, _stream, accepted = payload
                loop.call_soon_threadsafe(self._settle, accepted, None, error)

    def _run_commands(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._add(*payload)
            elif kind == "abort":
                self.engine.abort(payload)
                self._streams.pop(payload, None)

    def _add(self, prompt, params, request_id, lora_request, loop, stream, accepted) -> None:
        try:
            request_id = self.engine.add_request(prompt, params, request_id, lora_request)
        except Exception as error:  # bad input: tell the caller, keep serving
            loop.call_soon_threadsafe(self._settle, accepted, None, error)
            return
        self._streams[request_id] = (loop, stream)
        loop.call_soon_threadsafe(self._settle, accepted, request_id, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("engine step failed")
            self._fail_all(EngineStepError(f"Request failed during generation: {error}"))
            return
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            target = self._streams.get(output.request_id)
            if target is None:
                continue
            loop, stream = target
            item = EngineStepError(f"Request failed during generation: {output.error}") if output.error else output
            deliveries.setdefault(loop, []).append((stream, item))
            if output.finished:
                del self._streams[output.request_id]
        for loop, items in deliveries.items():  # one wake-up of each loop a step, not one an output
            loop.call_soon_threadsafe(deliver, items)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for loop, stream in self._streams.values():
            loop.call_soon_threadsafe(stream.put_nowait, error)
        self._streams.clear()

    def _settle(self, future: asyncio.Future, request_id: str | None, error) -> None:
        """Resolve an add on the caller's loop; a caller already gone aborts its request."""
        if future.cancelled():
            if request_id is not None:
                self.abort(request_id)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(request_id)


async def stream_outputs(stream: asyncio.Queue, abort: Callable[[], None],
                         combine: Callable[[list], RequestOutput] | None = None) -> AsyncIterator[RequestOutput]:
    """A request's outputs as they come to its queue, up to the last one (an error that comes
    instead is raised); leaving early calls `abort`.

    Items that wait in the queue together come out as one output, `combine(items)` (by
    default the outputs `merged`): a reader that falls behind the engine, as a server's event
    loop does under load, then catches up with one response event for several steps instead
    of falling further behind (vLLM does the same)."""
    combine = combine or merged
    finished = False
    try:
        while not finished:
            waiting, item = [], await stream.get()
            while not isinstance(item, BaseException):
                waiting.append(item)
                if stream.empty():
                    item = None
                    break
                item = stream.get_nowait()
            if waiting:
                output = combine(waiting)
                finished = output.finished
                yield output
            if item is not None:  # an error, after what came before it
                finished = True
                raise item
    finally:
        if not finished:
            abort()


def merged(outputs: list[RequestOutput]) -> RequestOutput:
    """Outputs of one request, one after another, as one: the last, whose lists and texts
    already hold all of the others' (they are cumulative), with each sequence's `delta`
    joining what theirs said."""
    if len(outputs) == 1:
        return outputs[0]
    deltas: dict[int, str] = {}
    for output in outputs:
        for completion in output.outputs:
            deltas[completion.index] = deltas.get(completion.index, "") + completion.delta
    return replace(outputs[-1], outputs=[replace(c, delta=deltas[c.index]) for c in outputs[-1].outputs])


def deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
