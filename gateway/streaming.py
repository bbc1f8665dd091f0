"""Server-sent events and client-disconnect handling.

SSE: `data: <json>\\n\\n` per chunk, `data: [DONE]\\n\\n` at the end; an error after the headers went
out is sent in-band as `data: {"error": {...}}` followed by `data: [DONE]` (the openai SDK raises it).

Disconnects (DESIGN.md §8): Starlette cancels a *streaming* response when the client leaves, but a
plain handler keeps running to max_tokens. `run_until_disconnect` races the work against the ASGI
`http.disconnect` message and cancels the work (and so the gRPC calls: the scheduler aborts the
request and frees its blocks) when the client is gone first.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway.errors import APIError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was ready."""


def sse(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


def sse_error(err: APIError) -> bytes:
    return sse(json.dumps(err.body(), ensure_ascii=False))


class EventStreamResponse(StreamingResponse):
    """text/event-stream whose `on_close` runs however the response ends (completed, client gone,
    or cancelled before the body generator even started, when its own `finally` would never run)."""

    def __init__(self, body, on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def event_stream(body, on_close: Callable[[], None]) -> EventStreamResponse:
    return EventStreamResponse(body, on_close)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first (then cancel it, raise ClientDisconnected).
    The request body must have been read already."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException as e:  # noqa: BLE001 (cancelled or failed while cancelling: the client is gone anyway)
        logger.debug("work ended after the client left: %r", e)
    raise ClientDisconnected()
