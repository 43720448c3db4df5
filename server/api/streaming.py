"""Server-sent events, and watching a client that may leave before its answer is ready."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


# Characters that line readers split on (Python's str.splitlines, and so httpx's and requests'
# iter_lines) although JSON leaves them raw: written as JSON escapes, which every parser reads
# back, so that an event's `data:` line stays one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
KEEPALIVE_SECONDS = 15.0  # TGI's: an SSE comment when a stream has had nothing to say this long


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


def tgi_event(payload: dict[str, Any]) -> str:
    return f"data:{_json(payload)}\n\n"


def openai_event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else _json(payload)
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: finished, failed or cut off by
    the client (Starlette cancels the iteration when the client leaves, which aborts the
    engine request inside it)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(with_keepalive(events, KEEPALIVE_SECONDS), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def with_keepalive(events: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """`events`, with an SSE comment (":") after each `interval` seconds without one, so that
    proxies with idle timeouts keep a stream whose prompt is still queued or prefilling."""
    iterator = aiter(events)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ":\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(iterator))
    finally:  # the client may have left: the events' own clean-up (an abort) runs now
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        with contextlib.suppress(BaseException):
            await iterator.aclose()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return task.result()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as their items arrive, tagged with their position."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((position, item))
            await queue.put((position, done))
        except BaseException as error:  # handed to the consumer, which re-raises it
            await queue.put((position, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
