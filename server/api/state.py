"""What the routes share: the engine, the limits, the metrics, and the count of requests in flight."""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from typing import Callable

from server.api.errors import APIError, overloaded, unavailable
from server.api.generation import Generation, SequenceResult
from server.api.metrics import Metrics
from server.api.settings import ServerSettings
from server.api.streaming import ClientDisconnected
from server.engine.async_engine import AsyncEngine

logger = logging.getLogger("server.requests")

# TGI's failure labels, by error_type.
_FAILURE_LABELS = {"validation": "validation", "overloaded": "overloaded", "generation": "generation",
                   "template_error": "template", "unavailable": "overloaded"}


class ServerState:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics()
        self.in_flight = 0
        self.draining = False

    def acquire(self) -> Callable[[], None]:
        """Take one of `max_concurrent_requests` slots, or refuse at once when none is free
        (TGI's `try_acquire`: a client is told to come back rather than queued for too long).
        Returns the slot's release, which may be called more than once."""
        if self.draining:
            raise unavailable()
        if self.in_flight >= self.settings.max_concurrent_requests:
            self.metrics.inc("tgi_request_failure", err="overloaded")
            raise overloaded()
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release

    @contextmanager
    def admission(self):
        release = self.acquire()
        try:
            yield
        finally:
            release()

    def refresh_gauges(self) -> None:
        stats = self.engine.stats()
        block_size = self.engine.config.cache.block_size
        in_use = stats.num_blocks - stats.num_free_blocks  # cached blocks that no sequence holds are free
        self.metrics.set("tgi_queue_size", stats.num_waiting)
        self.metrics.set("tgi_batch_current_size", stats.num_running)
        self.metrics.set("tgi_batch_current_max_tokens", in_use * block_size)
        self.metrics.set("tgi_batch_max_total_tokens", stats.num_blocks * block_size)
        self.metrics.set("tgi_kv_cache_blocks_in_use", in_use)
        self.metrics.set("tgi_kv_cache_blocks_total", stats.num_blocks)


class RequestTrace:
    """Timings of one request, for its response headers, the metrics and its log line."""

    def __init__(self, state: ServerState, route: str):
        self.state = state
        self.route = route
        self.start = time.monotonic()
        self.validated_at = self.start
        state.metrics.inc("tgi_request_count")

    def validated(self) -> None:
        self.validated_at = time.monotonic()
        self.state.metrics.observe("tgi_request_validation_duration", self.validated_at - self.start)

    def succeeded(self, generation: Generation, results: list[SequenceResult]) -> dict[str, str]:
        """Record a finished request; return TGI's timing headers."""
        end = time.monotonic()
        metrics = self.state.metrics
        m = generation.metrics
        first_scheduled = m.first_scheduled_time if m and m.first_scheduled_time else self.validated_at
        queue = max(0.0, first_scheduled - (m.arrival_time if m else self.validated_at))
        inference = max(0.0, end - first_scheduled)
        generated = sum(len(r.tokens) for r in results)
        per_token = inference / max(1, generated)
        metrics.inc("tgi_request_success")
        if generation.lora is not None:
            metrics.inc("tgi_request_adapter_count", adapter=generation.lora.lora_name)
        metrics.observe("tgi_request_duration", end - self.start)
        metrics.observe("tgi_request_queue_duration", queue)
        metrics.observe("tgi_request_inference_duration", inference)
        metrics.observe("tgi_request_mean_time_per_token_duration", per_token)
        metrics.observe("tgi_request_input_length", len(generation.token_ids))
        metrics.observe("tgi_request_generated_tokens", generated)
        metrics.observe("tgi_request_max_new_tokens", generation.params.max_tokens or 0)
        logger.info("%s done: input_tokens=%d generated_tokens=%d total=%.3fs validation=%.3fs "
                    "queue=%.3fs inference=%.3fs time_per_token=%.4fs finish=%s",
                    self.route, len(generation.token_ids), generated, end - self.start,
                    self.validated_at - self.start, queue, inference, per_token,
                    ",".join(str(r.finish_reason) for r in results),
                    extra={"route": self.route, "input_tokens": len(generation.token_ids),
                           "generated_tokens": generated, "total_time": end - self.start,
                           "queue_time": queue, "inference_time": inference})
        ms = lambda seconds: str(int(seconds * 1000))  # noqa: E731
        return {
            "x-compute-type": "cpu" if self.state.settings.model_device_type == "cpu" else "gpu+optimized",
            "x-compute-time": f"{end - self.start:.6f}",
            "x-compute-characters": str(sum(len(r.text) for r in results)),
            "x-total-time": ms(end - self.start), "x-validation-time": ms(self.validated_at - self.start),
            "x-queue-time": ms(queue), "x-inference-time": ms(inference),
            "x-time-per-token": ms(per_token), "x-prompt-tokens": str(len(generation.token_ids)),
            "x-generated-tokens": str(generated),
        }

    def failed(self, error: BaseException) -> None:
        if isinstance(error, APIError):
            label = _FAILURE_LABELS.get(error.error_type, "generation")
            if error.error_type == "overloaded":
                label = None  # already counted where it was refused
            message = error.message
        elif isinstance(error, (ClientDisconnected, asyncio.CancelledError, GeneratorExit)):
            label, message = "dropped", "client disconnected"
        else:
            label, message = "incomplete", repr(error)
        if label:
            self.state.metrics.inc("tgi_request_failure", err=label)
        logger.info("%s failed after %.3fs: %s", self.route, time.monotonic() - self.start, message,
                    extra={"route": self.route, "error": message})
