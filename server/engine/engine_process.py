"""The engine for servers, in a process of its own: `AsyncEngine`'s interface to the API layer
over an engine that runs in a child process (engine_core.py).

In one process the model's step loop (scheduling, sampling bookkeeping, detokenizing, making
outputs) and the event loop (HTTP, validation, JSON, SSE) take turns holding the GIL, and
under load each makes the other wait: the device idles between steps while the server
streams. Here they run side by side. The child is started with the spawn method, so that
CUDA is initialised there only. This process keeps what validation needs at hand: the same
tokenizer (prompts, chat templates, token texts), the grammar checks, and the facts the child
reports once at start (config, adapters). A writer thread sends the commands; a reader thread
takes each step's report, hands each request's delta to its queue, and wakes each event loop
once for all of them; a request's reader rebuilds its output from the deltas that came by
then. If the child dies, every open and later request gets `EngineDeadError`.

`python -m server --engine-process` chooses between this and `AsyncEngine`: by default this on
a GPU, where the host's work per step competes with a step of a few milliseconds, and the
thread on the CPU, where a step of the model takes far longer than the host's work around it
and a second process would only add its start-up (an interpreter importing torch: seconds
for every server a test starts) and its memory.
"""
from __future__ import annotations

import asyncio
import atexit
import fcntl
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from server.config import EngineArgs, EngineConfig
from server.engine.async_engine import EngineDeadError, EngineStats, EngineStepError, deliver, stream_outputs
from server.engine.engine_core import EngineFacts, StepReport, run_engine_core
from server.engine.guidance import Guidance
from server.engine.output_deltas import OutputRebuilder, delta_status
from server.engine.tokenizer import Tokenizer
from server.outputs import RequestOutput
from server.sampling_params import LoRARequest, SamplingParams

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30  # for the child to stop its ranks and exit, before it is killed


@dataclass
class _OpenRequest:
    """A request as the server's process follows it: where its outputs go."""

    request_id: str  # the caller's
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue
    rebuilder: OutputRebuilder


class ProcessEngine:
    def __init__(self, args: EngineArgs, configure_logging: Callable[[], None] | None = None):
        """Start the engine's process and wait until it serves; raises what stopped it from
        starting (a bad model, too little memory) as it was raised there.

        `configure_logging` (picklable: a module's function or a partial of one) sets up the
        child's logs as the server's are."""
        context = multiprocessing.get_context("spawn")
        child_commands, self._commands = context.Pipe(duplex=False)
        self._replies, child_replies = context.Pipe(duplex=False)
        _widen(self._replies)
        # Not a daemon: a daemon may not start the tensor-parallel ranks' processes.
        self._process = context.Process(
            target=run_engine_core, name="engine",
            args=(args, child_commands, child_replies, os.getpid(), configure_logging))
        self._process.start()
        child_commands.close()  # the child holds its own ends: a closed pipe now means it is gone
        child_replies.close()
        logger.info("engine process started (pid %d)", self._process.pid)
        facts = self._wait_until_ready()
        atexit.register(self.shutdown)  # an exit that skips shutdown() must not wait on the child forever
        self.config: EngineConfig = facts.config
        self.lora_adapters = list(facts.lora_adapters)
        self.tokenizer = Tokenizer.load(facts.tokenizer_path, facts.gguf_file)
        self.guidance = Guidance(self.tokenizer, facts.config.model.vocab_size, facts.eos_token_ids, on_gpu=False)
        self.dead_error: BaseException | None = None
        self._stats = facts.stats
        self._requests: dict[str, _OpenRequest] = {}  # by the id the engine knows it by
        self._engine_ids: dict[str, str] = {}  # the caller's request id -> the engine's
        self._next_id = itertools.count()
        self._lock = threading.Lock()  # a new request against the engine's death
        self._outbox: queue.Queue = queue.Queue()
        self._stopping = False
        threading.Thread(target=self._write, name="engine-commands", daemon=True).start()
        self._reader = threading.Thread(target=self._read, name="engine-outputs", daemon=True)
        self._reader.start()

    def _wait_until_ready(self) -> EngineFacts:
        try:
            kind, payload = self._replies.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} "
                               "while starting") from None
        if kind == "failed":
            self._process.join()
            raise payload
        return payload

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early aborts the request."""
        request_id = uuid.uuid4().hex if request_id is None else request_id
        # The engine knows each request by an id of its own, so that outputs still on their way
        # from an aborted request are never taken for those of a new one of the same id.
        engine_id = f"{request_id}.{next(self._next_id)}"
        request = _OpenRequest(request_id, asyncio.get_running_loop(), asyncio.Queue(), OutputRebuilder(request_id))
        with self._lock:
            if not self.is_alive:
                raise EngineDeadError(f"the engine has stopped: {self.dead_error or 'its process exited'}")
            if request_id in self._engine_ids:
                raise ValueError(f"request id {request_id!r} is already running")
            self._requests[engine_id] = request
            self._engine_ids[request_id] = engine_id
        self._outbox.put(("add", engine_id, prompt, params, lora_request))
        try:
            async with aclosing(stream_outputs(request.stream, lambda: self._abort(engine_id),
                                               request.rebuilder.rebuild)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            if self._engine_ids.get(request_id) == engine_id:
                del self._engine_ids[request_id]

    @property
    def is_alive(self) -> bool:
        return self.dead_error is None and self._process.is_alive()

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def stats(self) -> EngineStats:
        """As of the engine's last report (one a step)."""
        return self._stats

    def abort(self, request_id: str) -> None:
        engine_id = self._engine_ids.pop(request_id, None)
        if engine_id is not None:
            self._abort(engine_id)

    def _abort(self, engine_id: str) -> None:
        self._requests.pop(engine_id, None)
        self._outbox.put(("abort", engine_id))

    def shutdown(self) -> None:
        """Stop the engine (it stops its tensor-parallel ranks) and wait for its process."""
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.shutdown)
        self._outbox.put(("stop",))
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %d s: killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()
        self._reader.join(5)

    # -- the threads that talk to the engine's process -------------------------------------
    def _write(self) -> None:
        """Send the commands, as many at once as have come."""
        while True:
            commands = [self._outbox.get()]
            while not self._outbox.empty():
                commands.append(self._outbox.get_nowait())
            try:
                self._commands.send(commands)
            except OSError:
                return  # the engine's process is gone; the reader says so
            if any(kind == "stop" for kind, *_ in commands):
                return

    def _read(self) -> None:
        reason = None
        while True:
            try:
                kind, payload = self._replies.recv()
            except (EOFError, OSError):
                break
            if kind == "dead":
                reason = payload
                break
            self._dispatch(payload)
        self._process.join(5)
        reason = reason or f"the engine process exited with code {self._process.exitcode}"
        if not self._stopping:
            logger.error("the engine has stopped: %s", reason)
        self._die(reason)

    def _dispatch(self, report: StepReport) -> None:
        self._stats = report.stats
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for delta in report.outputs:
            engine_id, finished, error = delta_status(delta)
            request = self._requests.get(engine_id)
            if request is None:  # aborted meanwhile
                continue
            # Outputs are rebuilt where they are read, from as many deltas as have come by then.
            item = EngineStepError(f"Request failed during generation: {error}") if error else delta
            deliveries.setdefault(request.loop, []).append((request.stream, item))
            if finished:
                self._requests.pop(engine_id, None)
        for engine_id, error in report.failures:
            request = self._requests.pop(engine_id, None)
            if request is not None:
                deliveries.setdefault(request.loop, []).append((request.stream, error))
        for loop, items in deliveries.items():  # one wake-up of each loop a step, not one an output
            _call_soon(loop, deliver, items)

    def _die(self, reason: str) -> None:
        with self._lock:
            self.dead_error = RuntimeError(reason)
            requests, self._requests = self._requests, {}
        error = EngineDeadError(f"the engine has stopped: {reason}")
        for request in requests.values():
            _call_soon(request.loop, request.stream.put_nowait, error)


REPLY_PIPE_BYTES = 1 << 20


def _widen(connection) -> None:
    """Give the pipe of the engine's reports a megabyte of buffer (Linux's default is 64 KB,
    less than one step's report for a few hundred requests): the engine's loop writes a report
    and goes on stepping while this process's reader thread waits its turn for the GIL,
    instead of waiting for it with the device idle."""
    try:
        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, REPLY_PIPE_BYTES)
    except (OSError, AttributeError):  # not Linux, or a system limit below it: the default stays
        pass


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed: nobody waits there any more
        pass
