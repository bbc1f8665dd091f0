"""Executor supervision for the EngineLoop (DESIGN.md §8, "we recover instead"): replay after a
failed step, give up after repeated failures, health probes, going down and reconnecting with
backoff, expiring requests that waited too long for an executor, and rebuilding the engine when
the executor comes back with another geometry. A mixin: the state lives on the EngineLoop."""
from __future__ import annotations

import logging
import time

import grpc

from engine_core.engine_core import EngineCore
from engine_core.executor.base import ExecutorError, ExecutorInfo
from engine_core.scheduler import RequestOutputDelta
from engine_core.tokenizer import load_engine_tokenizer
from services.scheduler.sinks import CallFailed

logger = logging.getLogger(__name__)

# ExecutorInfo fields that must not change across an executor restart for requests to be replayed.
GEOMETRY = ("model_name", "vocab_size", "max_model_len", "num_kv_blocks", "block_size", "eos_token_ids")


class ServiceEngineCore(EngineCore):
    """EngineCore whose executor failures are handled by the EngineLoop: a failed step only
    requeues every unfinished request for replay and records the error; resetting the executor,
    waiting for it and giving up are the loop's business (the base class resets at once and
    raises after MAX_REPLAYS failures in the process's lifetime, which suits the offline engine,
    not a long-running service)."""

    last_error: ExecutorError | None = None

    def _recover(self, error: Exception) -> None:
        self.counters.executor_restarts += 1
        self.last_error = error  # type: ignore[assignment]
        self.requeue_all()

    def requeue_all(self) -> None:
        """Every unfinished request back to waiting, re-prefilled from its tokens (the scheduler
        also drops the prefix cache: the restarted executor's KV cache is empty)."""
        self.scheduler.requests_for_replay()

    def switch_executor(self, executor) -> int:
        """Continue on `executor` (same geometry, already reset): steps in flight on the old one
        are abandoned and every unfinished request is replayed there. Returns how many."""
        self._in_flight.clear()
        self.executor.abandon_in_flight()
        self.executor = executor
        self.requeue_all()
        return self.scheduler.num_unfinished

    def take_pending(self) -> list[RequestOutputDelta]:
        """Final messages of requests finished outside a step (aborts), without stepping."""
        pending, self._pending = self._pending, []
        return pending


class ExecutorSupervision:
    """EngineLoop methods that keep an executor usable (see the module docstring)."""

    MAX_CONSECUTIVE_FAILURES = 3
    HEALTH_PROBE_INTERVAL_S = 2.0
    BACKOFF_INITIAL_S = 0.1
    BACKOFF_MAX_S = 1.0

    def _on_step_failure(self, error: ExecutorError) -> None:
        self._consecutive_failures += 1
        status = self._executor_health()
        if status not in ("SERVING", None):
            self._go_down(f"{error} (health: {status})")
            return
        logger.warning("executor step failed (%d in a row); replaying %d requests: %s",
                       self._consecutive_failures, self.core.scheduler.num_unfinished, error)
        if self._consecutive_failures >= self.MAX_CONSECUTIVE_FAILURES:
            self._fail_all(f"the executor failed {self._consecutive_failures} steps in a row: {error}")
            self._consecutive_failures = 0
        try:
            self.executor.reset()
        except ExecutorError as e:
            self._go_down(f"reset after a failed step failed: {e}")

    def _executor_health(self) -> str | None:
        """SERVING / NOT_SERVING / UNREACHABLE ... for a remote executor; None for a local one."""
        health = getattr(self.executor, "health", None)
        return health(timeout=1.0) if callable(health) else None

    def _probe(self) -> None:
        self._last_contact = time.monotonic()
        status = self._executor_health()
        if status not in ("SERVING", None):
            self._go_down(f"health check: {status}")

    def _go_down(self, reason: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = self.down_since = now
            logger.warning("executor %s unavailable: %s; holding %d requests, retrying (requests fail after "
                           "%.0fs)", self.executor_name, reason,
                           self.core.scheduler.num_unfinished if self.core else 0, self.executor_timeout_s)
        self._down_reason = self.down_reason = reason
        self._backoff = self.BACKOFF_INITIAL_S
        self._next_attempt = now + self._backoff
        self._set_health(False)

    def _try_connect(self) -> None:
        """One reconnect attempt (backoff doubles on failure, up to BACKOFF_MAX_S)."""
        now = time.monotonic()
        try:
            if self.executor is None:
                self.executor = self._make_executor(self.config)
            status = self._executor_health()
            if status not in ("SERVING", None):
                raise ExecutorError(f"health: {status}")
            info = self.executor.describe()
            if self.core is None:
                self._build_core(info)
            elif any(getattr(info, k) != getattr(self.info, k) for k in GEOMETRY):
                self._fail_all(f"the executor came back with a different model or KV geometry "
                               f"({info.model_name}, {info.num_kv_blocks} blocks x {info.block_size}); "
                               f"in-flight requests cannot be replayed", code=grpc.StatusCode.UNAVAILABLE)
                old = self.core
                self._build_core(info)
                self.core.counters = old.counters
                self.core.scheduler.finished_by_reason = old.scheduler.finished_by_reason
            else:
                self.executor.reset()
                self.core.requeue_all()
        except ExecutorError as e:
            self._down_reason = self.down_reason = str(e)
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
            self._next_attempt = now + self._backoff
            logger.debug("executor %s not available yet: %s", self.executor_name, e)
            return
        was_down = now - self._down_since
        first = self.info is None
        self.info = self.core.info
        self._down_since = self.down_since = None
        self._consecutive_failures = 0
        self._last_contact = time.monotonic()
        self._set_health(True)
        if first:
            i = self.info
            logger.info("connected to executor %s: %s on %s (%s), %d KV blocks x %d tokens, max_model_len %d",
                        self.executor_name, i.model_name, i.device, i.dtype, i.num_kv_blocks, i.block_size,
                        i.max_model_len)
        else:
            logger.warning("executor %s is back after %.1fs; replaying %d requests", self.executor_name,
                           was_down, self.core.scheduler.num_unfinished)
        deferred, self._deferred = self._deferred, []
        for call in deferred:
            self._add(call)

    def _build_core(self, info: ExecutorInfo) -> None:
        if self.tokenizer is None:  # --tokenizer, or the model of an in-process executor
            try:
                self.tokenizer = load_engine_tokenizer(self.config, self.executor)
            except (OSError, ValueError) as e:
                logger.warning("no tokenizer (%s): structured output requests will be refused", e)
        # describes the executor again
        self.core = ServiceEngineCore(self.config, self.executor, tokenizer=self.tokenizer)

    def _expire(self, now: float) -> None:
        """While the executor is down: fail what has waited longer than executor_timeout_s."""
        timeout = self.executor_timeout_s
        since = self._down_since
        msg = (f"executor {self.executor_name} unavailable for more than {timeout:.0f}s "
               f"({self._down_reason}); request not completed")
        for call in [c for c in self._deferred if now - max(c.submitted, since) > timeout]:
            self._deferred.remove(call)
            self._admit(call, CallFailed(grpc.StatusCode.UNAVAILABLE, msg))
        if self.core is None or not self._routes:
            return
        expired = [cid for cid, r in self._routes.items() if now - max(r.call.submitted, since) > timeout]
        if expired:
            self._fail_all(msg, code=grpc.StatusCode.UNAVAILABLE, only=expired)
