"""Zero-downtime executor swap (issue 16): the EngineLoop moves every in-flight request onto another
executor with the same model and KV geometry, by the replay path an executor restart takes
(services/scheduler/executor_supervision.py): steps in flight on the old executor are abandoned,
every unfinished request goes back to waiting with its tokens and is re-prefilled on the new one.
No request fails; greedy output is unchanged (the same tokens are recomputed). A mixin: the state
lives on the EngineLoop; the switch runs on the engine thread between two steps."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from engine_core.executor.base import Executor, ExecutorError
from services.scheduler.executor_supervision import GEOMETRY
from services.scheduler.sinks import CallFailed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapResult:
    old_executor: str
    new_executor: str
    replayed_requests: int
    switch_s: float


class ExecutorSwap:
    """EngineLoop methods for `swap_executor` (see the module docstring)."""

    def swap_executor(self, connect: Callable[[], Executor], name: str, fut: asyncio.Future) -> None:
        """Event-loop side: switch to the executor `connect()` returns (`name` for logs); `fut` gets
        a SwapResult or a CallFailed."""
        self._submit(("swap", connect, name, fut))

    def _swap(self, connect: Callable[[], Executor], name: str, fut: asyncio.Future) -> None:
        t0 = time.perf_counter()
        if self.core is None:
            self._resolve_later(fut, CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                                "the scheduler has not connected to an executor yet"))
            return
        new: Executor | None = None
        try:
            new = connect()
            info = new.describe()
            changed = [k for k in GEOMETRY if getattr(info, k) != getattr(self.info, k)]
            if changed:
                new.shutdown()
                self._resolve_later(fut, CallFailed(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"executor {name} differs in {', '.join(changed)} ({info.model_name}, {info.num_kv_blocks} "
                    f"blocks x {info.block_size}): in-flight requests could not be replayed there"))
                return
            new.reset()
        except ExecutorError as e:
            if new is not None:
                new.shutdown()
            self._resolve_later(fut, CallFailed(grpc.StatusCode.UNAVAILABLE, f"executor {name}: {e}"))
            return
        old, old_name = self.executor, self.executor_name
        replayed = self.core.switch_executor(new)
        self.executor, self.executor_name = new, name
        self._make_executor = lambda _config: connect()  # a later reconnect goes to the new one too
        if self._down_since is not None:
            self._next_attempt = 0.0  # down meanwhile: the reconnect path takes over at once
        self._consecutive_failures = 0
        self._last_contact = time.monotonic()
        try:
            old.shutdown()  # our client of it; the process is its owner's to stop
        except Exception:
            logger.exception("closing the old executor client failed")
        took = time.perf_counter() - t0
        logger.warning("executor swapped: %s -> %s; replaying %d requests (switch took %.3fs)", old_name, name,
                       replayed, took)
        self._resolve_later(fut, SwapResult(old_name, name, replayed, took))
