"""The engine's own process: an `LLMEngine` (and the tensor-parallel ranks it starts) stepping
in a loop, fed commands by the server's process over one pipe and answering over another.

What crosses: lists of commands in (add a request, abort one, stop); out, first the facts the
server needs (`EngineFacts`) or why the engine could not start, then one `StepReport` after
each turn of the loop that did anything: every output of the step (as `OutputDelta`s), the
requests ended without one (refused input, a failed step) and the engine's counts for
/metrics. The process ignores SIGINT and SIGTERM, which a terminal or a process-group kill
sends to every process of the server: the server's process drains its requests first and
then stops this one; it also exits once the server's process is gone.
"""
from __future__ import annotations

import logging
import pickle
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, NamedTuple

import torch

from server.config import EngineArgs, EngineConfig
from server.engine.async_engine import EngineStats, EngineStepError, engine_stats
from server.engine.llm_engine import LLMEngine
from server.engine.output_deltas import OutputDelta, OutputEncoder
from server.runtime.workers import exit_with_parent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineFacts:
    """What the server's process needs of the engine, read once when it has started."""

    config: EngineConfig
    lora_adapters: list[str]  # in the order they were loaded
    eos_token_ids: set[int]  # with the model's vocabulary size, what the server's grammar checks need
    tokenizer_path: str  # where the server's process loads the same tokenizer from
    gguf_file: str | None
    stats: EngineStats


class StepReport(NamedTuple):
    outputs: list[OutputDelta]
    failures: list[tuple[str, BaseException]]  # requests ended without an output, and why
    stats: EngineStats


def run_engine_core(args: EngineArgs, commands: Connection, replies: Connection, parent_pid: int,
                    configure_logging: Callable[[], None] | None) -> None:
    """The engine process's body (started with the spawn method by ProcessEngine)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(parent_pid,), daemon=True).start()
    if configure_logging is not None:
        configure_logging()
    if not (args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())):
        # On the CPU the model's threads would fight the server's process for every core:
        # OpenMP's threads wait for each other at every op, so one without a core stalls them
        # all (a tiny model on two cores served 5x fewer tokens a second with both).
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    try:
        engine = LLMEngine(args)
        source = engine.source
    except BaseException as error:  # noqa: BLE001 - whatever it was, the server's process reports it
        replies.send(("failed", portable(error)))
        return
    core = EngineCore(engine, replies)
    try:
        replies.send(("ready", EngineFacts(engine.config, list(engine.lora_adapters), set(engine.eos_token_ids),
                                           source.path, source.gguf_file, engine_stats(engine))))
        core.run(commands)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the server's process is gone
    except BaseException as error:  # a bug in the loop itself: say so, never leave callers waiting
        logger.exception("engine loop died")
        try:
            replies.send(("dead", f"{type(error).__name__}: {error}"))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        engine.shutdown()


class EngineCore:
    def __init__(self, engine: LLMEngine, replies: Connection):
        self.engine = engine
        self.replies = replies
        self.encoder = OutputEncoder()
        engine.delta_encoder = self.encoder  # its steps give deltas (a failed request's output, encoded here)
        self.outputs: list[OutputDelta] = []
        self.failures: list[tuple[str, BaseException]] = []

    def run(self, commands: Connection) -> None:
        """Until the server says stop: take every command that has come, step, report."""
        while self._take_commands(commands, wait=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                self._step()
            self.replies.send(("step", StepReport(self.outputs, self.failures, engine_stats(self.engine))))
            self.outputs, self.failures = [], []

    def _take_commands(self, commands: Connection, wait: bool) -> bool:
        """Run the commands that have come (waiting for one when idle); False once told to stop."""
        timeout = None if wait else 0
        while commands.poll(timeout):
            for kind, *payload in commands.recv():
                if kind == "add":
                    self._add(*payload)
                elif kind == "abort":
                    self.engine.abort(payload[0])
                    self.encoder.forget(payload[0])
                elif kind == "stop":
                    return False
            timeout = 0
        return True

    def _add(self, request_id, prompt, params, lora_request) -> None:
        try:
            self.engine.add_request(prompt, params, request_id, lora_request)
        except Exception as error:  # bad input: tell the caller, keep serving
            self.failures.append((request_id, portable(error)))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("engine step failed")
            failure = EngineStepError(f"Request failed during generation: {error}")
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
                self.encoder.forget(request_id)
                self.failures.append((request_id, failure))
            return
        self.outputs.extend(output if isinstance(output, tuple) else self.encoder.encode(output) for output in outputs)


def portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle means the same here
        return RuntimeError(f"{type(error).__name__}: {error}")
