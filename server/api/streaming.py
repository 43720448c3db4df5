"""Server-sent events, and watching a client that may leave before its answer is ready."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
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


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _json(payload: Any) -> str:
    text = _ENCODE(payload)
    if "\x85" in text or "\u2028" in text or "\u2029" in text:  # rare: a scan is cheaper than translate's
        text = text.translate(_LINE_BREAKS)
    return text


def tgi_event(payload: dict[str, Any]) -> str:
    return f"data:{_json(payload)}\n\n"


def openai_event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else _json(payload)
    return f"data: {data}\n\n"


def openai_chunks(base: dict[str, Any], with_usage: bool = False) -> Callable[[list[dict[str, Any]]], str]:
    """The events of one OpenAI stream's chunks: `base`'s fields (id, object, created, model),
    encoded once for the whole stream, then the `choices` given for each chunk, then a null
    `usage` when the stream ends with one."""
    head = f"data: {_json(base)[:-1]},\"choices\":"
    tail = ',"usage":null}\n\n' if with_usage else "}\n\n"
    return lambda choices: head + _json(choices) + tail


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends: finished, failed or cut off by
    the client (Starlette cancels the iteration when the client leaves, which aborts the
    engine request inside it). While its events are slow to come it sends keep-alive comments
    (`send_with_keepalive`)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def send_text(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        await send_with_keepalive(self.body_iterator, send_text, KEEPALIVE_SECONDS)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def send_with_keepalive(events: AsyncIterator[str], send: Callable[[str], Awaitable[None]],
                              interval: float) -> None:
    """Send each of `events`, and an SSE comment (":") whenever `interval` seconds pass without
    anything sent, so that proxies with idle timeouts keep a stream whose prompt is still
    queued or prefilling. The comments come from a task of their own, so that an event costs
    no more than its send; a lock keeps the two from writing at once. However this ends, the
    events are closed (an abort when the client left)."""
    lock = asyncio.Lock()
    last_sent = time.monotonic()

    async def keep_alive() -> None:
        nonlocal last_sent
        while True:
            await asyncio.sleep(last_sent + interval - time.monotonic())
            if time.monotonic() - last_sent >= interval:
                async with lock:
                    await send(":\n\n")
                last_sent = time.monotonic()

    comments = asyncio.ensure_future(keep_alive())
    try:
        async for event in events:
            async with lock:
                await send(event)
            last_sent = time.monotonic()
    finally:  # the client may have left: the events' own clean-up (an abort) runs now
        comments.cancel()
        with contextlib.suppress(BaseException):
            await comments
        if hasattr(events, "aclose"):
            with contextlib.suppress(BaseException):
                await events.aclose()


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
    if len(streams) == 1:  # no tasks and no queue between each item and its reader
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
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
