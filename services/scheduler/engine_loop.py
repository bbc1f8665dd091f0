"""The scheduler service's engine thread: one EngineCore, stepped by one dedicated thread.

The asyncio gRPC handlers never touch the EngineCore. They put commands into a thread-safe inbox
(add a request, abort / finish requests, take a stats snapshot); the engine thread applies them
between steps, steps while there is work and sleeps on a condition variable when there is none
(no busy spin). Outputs go back to the event loop in one `loop.call_soon_threadsafe` per step:
`_route` groups the step's deltas by sink (services/scheduler/sinks.py: a Generate call, or a
GenerateStream carrying many requests) and each sink gets one `deliver` with all of its deltas.

Executor failures (DESIGN.md §8: "we recover instead"):
- a failed step (ExecutorError) puts every unfinished request back in the waiting queue with its
  tokens (the EngineCore replay); the executor is reset and they are re-prefilled from
  prompt + generated tokens, so clients only see a pause;
- while the executor is unreachable or not SERVING (killed, restarting, still loading) the
  scheduler reports NOT_SERVING, keeps (and keeps accepting) requests, and reconnects with
  exponential backoff; a request that has waited longer than `executor_timeout_s` for it fails
  with UNAVAILABLE and a message saying so;
- an executor that is reachable but fails MAX_CONSECUTIVE_FAILURES steps in a row (a poisoned
  batch, a model bug) fails the unfinished requests with FINISH_REASON_ERROR instead of replaying
  forever;
- an executor that comes back with a different KV geometry (another model, another KV budget)
  fails the in-flight requests (their block ids mean nothing there) and the engine is rebuilt.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

import grpc

from engine_core.config import EngineConfig
from engine_core.executor.base import Executor, ExecutorInfo
from services.gen.pagedserve.v1 import scheduler_pb2
from services.scheduler.calls import GenerateCall, Route
from services.scheduler.executor_supervision import (
    ExecutorSupervision,
    ServiceEngineCore,
)
from services.scheduler.executor_swap import ExecutorSwap
from services.scheduler.output_routing import OutputRouting
from services.scheduler.sinks import CallFailed
from services.scheduler.stats_publishing import StatsPublishing

logger = logging.getLogger(__name__)

__all__ = ["CallFailed", "EngineLoop", "GenerateCall"]


class EngineLoop(ExecutorSupervision, ExecutorSwap, OutputRouting, StatsPublishing):
    """One EngineCore on its own thread (module docstring). Executor supervision, output routing
    and stats publishing are mixins in their own modules; this class holds the state, the
    event-loop side API and the thread's loop."""

    def __init__(self, config: EngineConfig, make_executor: Callable[[EngineConfig], Executor], *,
                 executor_name: str = "executor", executor_timeout_s: float = 30.0,
                 max_queue_len: int = 0, tokenizer=None) -> None:
        self.config = config
        self._make_executor = make_executor
        self.executor_name = executor_name
        self.executor_timeout_s = executor_timeout_s
        self.max_queue_len = max_queue_len
        self.executor: Executor | None = None
        self.core: ServiceEngineCore | None = None
        # The model's tokenizer, for structured output (grammars are compiled against its vocabulary).
        self.tokenizer = tokenizer
        self.info: ExecutorInfo | None = None  # read by the event loop (atomic reference swap)

        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_health: Callable[[bool], None] = lambda serving: None
        self._on_fatal: Callable[[BaseException], None] = lambda e: None
        self._posts: list[tuple[Callable, tuple]] = []

        # Engine-thread state.
        self._routes: dict[str, Route] = {}
        self._deferred: list[GenerateCall] = []  # adds that arrived before the first connect
        self._down_since: float | None = time.monotonic()  # not connected yet counts as down
        self._down_reason = "not connected yet"
        self._next_attempt = 0.0
        self._backoff = self.BACKOFF_INITIAL_S
        self._consecutive_failures = 0
        self._last_contact = time.monotonic()  # last step / health probe that reached the executor
        self._throughput: collections.deque[tuple[float, int, int]] = collections.deque()
        self._last_publish = 0.0
        self._healthy: bool | None = None

        # Published for the event loop (plain attribute reads; stale by at most one step).
        self.num_waiting = 0
        self.num_running = 0
        self._adds_in_inbox = 0  # samples of add commands not applied yet (guarded by _cond)
        self.num_rejected = 0
        self.last_stats = scheduler_pb2.SchedulerStats(max_queue_len=max_queue_len)
        self.metrics = None  # services.metrics.SchedulerMetrics when --metrics-port is on
        self._published_steps = -1
        self.down_since: float | None = self._down_since
        self.down_reason = self._down_reason
        self.fatal_error: BaseException | None = None

    # ================================================================== event-loop side API
    def start(self, loop: asyncio.AbstractEventLoop, on_health: Callable[[bool], None],
              on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self._loop = loop
        self._on_health = on_health
        if on_fatal is not None:
            self._on_fatal = on_fatal
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _submit(self, cmd: tuple) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    def add(self, call: GenerateCall) -> None:
        with self._cond:
            self._inbox.append(("add", call))
            self._adds_in_inbox += call.n
            self._cond.notify()

    def compile_grammar(self, params):
        """Thread-safe (called from worker threads). None before the executor has connected:
        add_request compiles then."""
        core = self.core
        if core is None:
            if params.structured_outputs is not None and self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer: start the scheduler with --tokenizer")
            return None
        return core.compile_grammar(params)

    def queue_estimate(self) -> tuple[int, int]:
        """(samples waiting or about to, samples running): what admission control looks at."""
        with self._cond:
            return self.num_waiting + self._adds_in_inbox, self.num_running

    def abort(self, ids: list[str], stop_str: str | None = None) -> None:
        """Finish engine-level requests: aborted, or stopped by a stop string (stop_str set)."""
        self._submit(("abort", list(ids), stop_str))

    def request_stats(self, include_requests: bool, fut: asyncio.Future) -> None:
        self._submit(("stats", include_requests, fut))

    def down_for(self) -> float:
        """Seconds the executor has been unavailable (0 when it is up)."""
        since = self.down_since
        return 0.0 if since is None else time.monotonic() - since

    # ================================================================== engine thread
    def _post(self, fn: Callable, *args) -> None:
        self._posts.append((fn, args))

    def _flush(self) -> None:
        if not self._posts or self._loop is None:
            return
        posts, self._posts = self._posts, []

        def run() -> None:
            for fn, args in posts:
                try:
                    fn(*args)
                except Exception:
                    logger.exception("delivering an engine result failed")

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _set_health(self, serving: bool) -> None:
        if self._healthy is not serving:
            self._healthy = serving
            self._post(self._on_health, serving)

    @staticmethod
    def _resolve(fut: asyncio.Future, value) -> None:
        if not fut.done():
            fut.set_result(value)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._inbox and not self._stop:
                        self._cond.wait(self._wait_timeout())
                    if self._stop:
                        break
                    cmds = list(self._inbox)
                    self._inbox.clear()
                for cmd in cmds:
                    self._apply(cmd)
                now = time.monotonic()
                if self._down_since is not None:
                    if now >= self._next_attempt:
                        self._try_connect()
                    if self._down_since is not None:
                        self._expire(time.monotonic())
                        if self.core is not None:
                            self.core.expire_requests()  # request deadlines run on while it is down
                            self._route(self.core.take_pending())
                elif self.core.has_unfinished_requests():
                    self._step()
                elif now - self._last_contact >= self.HEALTH_PROBE_INTERVAL_S:
                    self._probe()
                self._publish()
                self._flush()
        except BaseException as e:
            logger.exception("engine thread crashed")
            self.fatal_error = e
            msg = f"scheduler engine failed: {type(e).__name__}: {e}"
            failed = {id(r.call): r.call for r in self._routes.values()}
            for call in failed.values():
                self._post(call.sink.fail, call, CallFailed(grpc.StatusCode.INTERNAL, msg))
            for cmd in self._inbox:
                if cmd[0] == "add":
                    self._admit(cmd[1], CallFailed(grpc.StatusCode.INTERNAL, msg))
            self._set_health(False)
            self._post(self._on_fatal, e)
            self._flush()
        finally:
            if self.executor is not None:
                try:
                    self.executor.shutdown()
                except Exception:
                    logger.exception("executor shutdown failed")

    def _wait_timeout(self) -> float:
        if self._down_since is not None:
            return max(0.0, min(self._next_attempt - time.monotonic(), 0.5))
        if self.core is not None and self.core.has_unfinished_requests():
            return 0.0
        return max(0.0, self._last_contact + self.HEALTH_PROBE_INTERVAL_S - time.monotonic())

    # ------------------------------------------------------------------ commands
    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(cmd[1])
        elif kind == "abort":
            self._abort(cmd[1], cmd[2])
        elif kind == "stats":
            self._resolve_later(cmd[2], self.stats_proto(cmd[1]))
        elif kind == "swap":
            self._swap(*cmd[1:])
        else:  # pragma: no cover
            raise ValueError(f"unknown engine command {kind!r}")

    def _resolve_later(self, fut: asyncio.Future, value) -> None:
        self._post(self._resolve, fut, value)

    def _admit(self, call: GenerateCall, verdict: CallFailed | None) -> None:
        self._post(call.sink.admitted, call, verdict)

    def _add(self, call: GenerateCall) -> None:
        try:
            self._add_inner(call)
        finally:
            with self._cond:
                self._adds_in_inbox -= call.n
                if self.core is not None:
                    self._publish_queues()

    def _add_inner(self, call: GenerateCall) -> None:
        if self.core is None:
            self._deferred.append(call)  # validated once the executor has described itself
            return
        core = self.core
        ids = call.child_ids
        try:
            taken = [cid for cid in ids if cid in self._routes]
            if taken:
                raise ValueError(f"request_id {taken[0]!r} is already in use")
            # All or nothing; n>1 / best_of / beam search share one prefill (engine_core/sequence_group.py).
            reqs = core.add_generation(call.request_id, ids, call.prompt_token_ids, call.params,
                                       arrival_time=call.submitted, trace_context=call.trace_context,
                                       compiled_grammar=call.compiled_grammar,
                                       priority=call.priority, timeout=call.timeout_s)
        except ValueError as e:
            self._admit(call, CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            return
        for i, (cid, req) in enumerate(zip(ids, reqs)):
            self._routes[cid] = Route(call, i, req)
        self._publish_queues()
        self._admit(call, None)

    def _abort(self, ids: list[str], stop_str: str | None) -> None:
        if self.core is None:
            gone = set(ids)
            for call in [c for c in self._deferred if set(c.child_ids) & gone]:
                self._deferred.remove(call)
                self._admit(call, CallFailed(grpc.StatusCode.CANCELLED, "aborted"))
            return
        ids = [i for i in ids if i in self._routes]
        if not ids:
            return
        # Blocks are freed now; the final messages go out right after the commands are applied.
        if stop_str is None:
            self.core.abort_requests(ids)
        else:
            self.core.finish_requests(ids, stop_reason=stop_str)
        self._route(self.core.take_pending())
        self._publish_queues()

    # ------------------------------------------------------------------ stepping
    def _step(self) -> None:
        core = self.core
        steps_before = core.counters.num_steps
        submitted_before = core.counters.steps_submitted
        t0 = time.perf_counter()
        deltas = core.step()
        if core.counters.num_steps > steps_before and self.metrics is not None:
            sched = core.scheduler
            self.metrics.observe_step(core.info.model_name, time.perf_counter() - t0, sched._last_step_tokens,
                                      sched._last_step_seqs)
        self._route(deltas)
        self._publish_queues()
        self._last_contact = time.monotonic()
        error, core.last_error = core.last_error, None
        if error is not None:
            self._on_step_failure(error)
        elif core.counters.num_steps > steps_before:
            self._consecutive_failures = 0
        elif not deltas and core.counters.steps_submitted == submitted_before:
            # Unfinished requests but nothing could be scheduled: do not spin.
            with self._cond:
                if not self._inbox and not self._stop:
                    self._cond.wait(0.01)

