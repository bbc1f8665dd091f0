"""Graceful drain of a gateway worker on SIGTERM (issue 16, finding 3).

    SIGTERM -> draining: new API requests get 503 + Retry-After (and /health 503, so a load
               balancer stops sending), requests in flight keep going;
            -> in flight finish within `grace_s`: the server exits at once after the last one;
            -> the grace is over: every request still generating is ended with an error — a stream
               gets an in-band error chunk and `data: [DONE]`, a plain request a 503 — and the
               server exits (uvicorn's own shutdown then finds only finished responses).

A second SIGTERM (or Ctrl-C) skips the wait. The launcher stops the gateway first, then the
scheduler, then the executor, so no stream loses its backend while the gateway drains.

`install_signal_drain` hooks the signals from inside the app (its lifespan, in the server's main
thread), in front of uvicorn's own handler, so every worker of `--workers N` drains too.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable

from gateway.errors import APIError
from gateway.middleware import route_path

logger = logging.getLogger(__name__)

# After the grace: how long the ended streams get to write their last chunks before the server exits.
FLUSH_S = 2.0
_DRAINED_PATHS = ("/v1/",)


def shutting_down_error(retry_after_s: int) -> APIError:
    return APIError(503, "The server is shutting down; send the request again (another replica or after the "
                    "restart).", code="service_unavailable", headers={"Retry-After": str(retry_after_s)})


class Drain:
    def __init__(self, grace_s: float, retry_after_s: int = 1) -> None:
        self.grace_s = grace_s
        self.retry_after_s = retry_after_s
        self.started_at: float | None = None
        self.in_flight = 0  # API requests inside the app (streams until their last chunk)
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self, fail_all: Callable[[APIError], int], on_done: Callable[[], None]) -> None:
        """Begin draining (call in the event loop); `on_done()` once nothing is in flight or the grace
        is over and the remaining requests were ended through `fail_all`."""
        if self.draining:
            return
        self.started_at = time.monotonic()
        logger.info("draining: %d requests in flight get up to %.1fs", self.in_flight, self.grace_s)
        self._task = asyncio.ensure_future(self._run(fail_all, on_done))

    async def _wait_idle(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0

    async def _run(self, fail_all: Callable[[APIError], int], on_done: Callable[[], None]) -> None:
        try:
            if not await self._wait_idle(self.grace_s):
                err = APIError(503, f"The server is shutting down and this request did not finish within the "
                                    f"{self.grace_s:g}s shutdown grace period.", code="service_unavailable",
                               headers={"Retry-After": str(self.retry_after_s)})
                ended = fail_all(err)
                logger.warning("drain: grace over, ended %d generations still running", ended)
                await self._wait_idle(FLUSH_S)
            logger.info("drained in %.1fs", time.monotonic() - self.started_at)
        finally:
            on_done()


class DrainMiddleware:
    """Counts API requests in flight and turns new ones away while draining (pure ASGI)."""

    def __init__(self, app, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith(_DRAINED_PATHS):
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining:
            err = shutting_down_error(drain.retry_after_s)
            err.headers["Connection"] = "close"
            await err.response()(scope, receive, send)
            return
        drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            drain.in_flight -= 1


def install_signal_drain(drain: Drain, begin_drain: Callable[[Callable[[], None]], None]) -> bool:
    """SIGTERM / SIGINT begin the drain, then hand over to the handler installed before (uvicorn's,
    which stops the server). Call inside the running server's event loop; only the main thread can
    take signals (False elsewhere, e.g. a server in a test thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous) -> None:
            if drain.draining:  # a second signal: stop now
                previous(signum, frame)
                return
            loop.call_soon_threadsafe(begin_drain, lambda: previous(signum, frame))

        signal.signal(sig, handler)
    return True
