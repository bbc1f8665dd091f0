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
from dataclasses import dataclass, field

import grpc

from engine_core.config import EngineConfig
from engine_core.engine_core import EngineCore
from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import RequestOutputDelta
from services.gen.pagedserve.v1 import scheduler_pb2
from services.scheduler.sinks import CallFailed, CallSink, SampleDelta, StreamSink

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    None: scheduler_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": scheduler_pb2.FINISH_REASON_STOP,
    "length": scheduler_pb2.FINISH_REASON_LENGTH,
    "abort": scheduler_pb2.FINISH_REASON_ABORT,
    "error": scheduler_pb2.FINISH_REASON_ERROR,
}
_GEOMETRY = ("model_name", "vocab_size", "max_model_len", "num_kv_blocks", "block_size", "eos_token_ids")


__all__ = ["CallFailed", "EngineLoop", "GenerateCall"]


@dataclass(eq=False)
class GenerateCall:
    """One request (a Generate call, or one request of a GenerateStream). The engine thread tells
    its `sink` (event loop side) whether it was admitted, then delivers its outputs there."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: CallSink | StreamSink
    key: int = 0  # the GenerateStream key (stream requests only)
    submitted: float = field(default_factory=time.monotonic)
    done: bool = False
    # W3C trace context for the executor's spans (services/tracing.py); None: not traced.
    trace_context: dict[str, str] | None = None
    remaining: int = 0  # samples without a final message yet (event-loop side bookkeeping)
    span: object = None  # the request's tracing.server_span (stream requests)

    def __post_init__(self) -> None:
        self.remaining = self.params.n

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def child_ids(self) -> list[str]:
        return child_ids(self.request_id, self.params.n)


def child_ids(request_id: str, n: int) -> list[str]:
    """Engine-level ids of a request's samples: the id itself for n=1, "<id>#<i>" for n>1."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


@dataclass(eq=False)
class _Route:
    call: GenerateCall
    index: int
    request: Request


class _ServiceEngineCore(EngineCore):
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

    def take_pending(self) -> list[RequestOutputDelta]:
        """Final messages of requests finished outside a step (aborts), without stepping."""
        pending, self._pending = self._pending, []
        return pending


class EngineLoop:
    MAX_CONSECUTIVE_FAILURES = 3
    HEALTH_PROBE_INTERVAL_S = 2.0
    BACKOFF_INITIAL_S = 0.1
    BACKOFF_MAX_S = 1.0
    STATS_PUBLISH_INTERVAL_S = 0.25
    THROUGHPUT_WINDOW_S = 10.0

    def __init__(self, config: EngineConfig, make_executor: Callable[[EngineConfig], Executor], *,
                 executor_name: str = "executor", executor_timeout_s: float = 30.0,
                 max_queue_len: int = 0) -> None:
        self.config = config
        self._make_executor = make_executor
        self.executor_name = executor_name
        self.executor_timeout_s = executor_timeout_s
        self.max_queue_len = max_queue_len
        self.executor: Executor | None = None
        self.core: _ServiceEngineCore | None = None
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
        self._routes: dict[str, _Route] = {}
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
        children = [call.params.for_child(i) for i in range(call.n)] if call.n > 1 else [call.params]
        added: list[str] = []
        try:
            for child in children:  # all or nothing
                core.validate_request(call.prompt_token_ids, child)
            for i, (cid, child) in enumerate(zip(ids, children)):
                if cid in self._routes:
                    raise ValueError(f"request_id {cid!r} is already in use")
                req = core.add_request(cid, call.prompt_token_ids, child, arrival_time=call.submitted,
                                       trace_context=call.trace_context)
                added.append(cid)
                self._routes[cid] = _Route(call, i, req)
        except ValueError as e:
            if added:
                for cid in added:
                    self._routes.pop(cid, None)
                core.abort_requests(added)
                core.take_pending()
            self._admit(call, CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            return
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

    def _route(self, deltas: list[RequestOutputDelta]) -> None:
        """One `deliver` per sink for the whole step (not one message per request x token)."""
        now = time.monotonic()
        batches: dict[int, tuple[CallSink | StreamSink, list[SampleDelta]]] = {}
        for d in deltas:
            route = self._routes.get(d.request_id)
            if route is None:
                continue
            final = None
            if d.finished:
                del self._routes[d.request_id]
                final = scheduler_pb2.GenerateResponse(index=route.index, finish_reason=FINISH_REASONS[d.finish_reason])
                self._finish_message(final, d, route.request, now)
            self._batch(batches, SampleDelta(route.call, route.index, d.new_token_ids, d.new_logprobs, final))
        self._deliver(batches)

    @staticmethod
    def _batch(batches: dict, item: SampleDelta) -> None:
        sink = item.call.sink
        entry = batches.get(id(sink))
        if entry is None:
            entry = batches[id(sink)] = (sink, [])
        entry[1].append(item)

    def _deliver(self, batches: dict) -> None:
        for sink, items in batches.values():
            self._post(sink.deliver, items)

    @staticmethod
    def _finish_message(msg: scheduler_pb2.GenerateResponse, d: RequestOutputDelta, req: Request,
                        now: float) -> None:
        if isinstance(d.stop_reason, str):
            msg.stop_str = d.stop_reason
        elif isinstance(d.stop_reason, int):
            msg.stop_token_id = d.stop_reason
        msg.usage.prompt_tokens = d.num_prompt_tokens
        msg.usage.completion_tokens = d.num_output_tokens
        msg.usage.cached_tokens = d.num_cached_tokens
        m = msg.metrics
        arrival = req.arrival_time
        m.e2e_latency_s = now - arrival
        m.num_preemptions = req.num_preemptions
        if req.first_scheduled_time is not None:
            m.queue_time_s = req.first_scheduled_time - arrival
        if req.first_token_time is not None:
            m.time_to_first_token_s = req.first_token_time - arrival
            m.decode_time_s = now - req.first_token_time
            if req.first_scheduled_time is not None:
                m.prefill_time_s = req.first_token_time - req.first_scheduled_time

    def _fail_all(self, message: str, code: grpc.StatusCode | None = None,
                  only: list[str] | None = None) -> None:
        """Finish unfinished requests as errors: in-band FINISH_REASON_ERROR + message, or (code
        set) end their calls with that gRPC status."""
        core = self.core
        ids = list(core.scheduler.requests) if only is None else only
        if not ids:
            return
        logger.error("failing %d requests: %s", len(ids), message)
        done = core.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
        now = time.monotonic()
        failed_calls: set[int] = set()
        batches: dict = {}
        for req in done:
            route = self._routes.pop(req.request_id, None)
            if route is None:
                continue
            if code is not None:
                if id(route.call) not in failed_calls:
                    failed_calls.add(id(route.call))
                    self._post(route.call.sink.fail, route.call, CallFailed(code, message))
                continue
            d = core.scheduler.abort_delta(req)
            msg = scheduler_pb2.GenerateResponse(index=route.index, finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                                 error_message=message)
            self._finish_message(msg, d, req, now)
            self._batch(batches, SampleDelta(route.call, route.index, [], None, msg))
        self._deliver(batches)
        self._publish_queues()

    # ------------------------------------------------------------------ executor availability
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
            elif any(getattr(info, k) != getattr(self.info, k) for k in _GEOMETRY):
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
        self.core = _ServiceEngineCore(self.config, self.executor)  # describes the executor again

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

    # ------------------------------------------------------------------ stats
    def _publish_queues(self) -> None:
        sched = self.core.scheduler
        self.num_waiting, self.num_running = len(sched.waiting), len(sched.running)

    def _publish(self) -> None:
        now = time.monotonic()
        # Also right away when the engine goes idle, so an idle scrape sees the final numbers.
        idle_news = (self.core is not None and not self.core.has_unfinished_requests()
                     and self.core.counters.num_steps != self._published_steps)
        if idle_news or now - self._last_publish >= self.STATS_PUBLISH_INTERVAL_S:
            self._last_publish = now
            self.last_stats = self.stats_proto(False)
            if self.core is not None:
                self._published_steps = self.core.counters.num_steps

    def _rates(self, now: float) -> tuple[float, float]:
        c = self.core.counters
        samples = self._throughput
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, c.prompt_tokens, c.generation_tokens))
        while len(samples) > 1 and samples[1][0] <= now - self.THROUGHPUT_WINDOW_S:
            samples.popleft()
        t0, p0, g0 = samples[0]
        dt = now - t0
        if dt <= 0:
            return 0.0, 0.0
        return (c.prompt_tokens - p0) / dt, (c.generation_tokens - g0) / dt

    def stats_proto(self, include_requests: bool) -> scheduler_pb2.SchedulerStats:
        """A SchedulerStats snapshot (engine thread only)."""
        out = scheduler_pb2.SchedulerStats(timestamp=time.time(), max_queue_len=self.max_queue_len,
                                           num_requests_rejected=self.num_rejected,
                                           executor_healthy=self._down_since is None)
        core = self.core
        if core is None:
            out.num_waiting = len(self._deferred)
            return out
        sched, bm, c = core.scheduler, core.scheduler.block_manager, core.counters
        st = core.stats()
        out.num_running = st.num_running
        out.num_waiting = st.num_waiting + len(self._deferred)
        out.kv_cache_usage = st.kv_cache_usage
        out.num_kv_blocks = st.num_kv_blocks
        out.num_free_blocks = st.num_free_blocks
        out.num_kv_blocks_cached = bm.num_cached_blocks
        out.num_tokens_in_used_blocks = sum(min(r.num_computed_tokens, r.num_tokens) for r in sched.running)
        out.prefix_cache_queries = st.prefix_cache_queries
        out.prefix_cache_hits = st.prefix_cache_hits
        out.prefix_cache_hit_rate = st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0
        out.num_preemptions = st.num_preemptions
        out.num_steps = c.num_steps
        out.prompt_tokens_total = c.prompt_tokens
        out.generation_tokens_total = c.generation_tokens
        for reason, count in st.finished_by_reason.items():
            out.finished_by_reason[reason] = count
        out.executor_restarts = c.executor_restarts
        out.prompt_throughput_tps, out.generation_throughput_tps = self._rates(time.monotonic())
        out.step_num_batched_tokens = st.step_num_batched_tokens
        out.step_num_seqs = st.step_num_seqs
        if include_requests:
            for status, reqs in (("running", sched.running), ("waiting", sched.waiting)):
                for r in reqs:
                    s = "preempted" if status == "waiting" and r.status == RequestStatus.PREEMPTED else status
                    out.requests.add(request_id=r.request_id, status=s, num_prompt_tokens=r.num_prompt_tokens,
                                     num_output_tokens=len(r.output_token_ids),
                                     num_computed_tokens=r.num_computed_tokens,
                                     block_ids=bm.get_block_ids(r.request_id))
            for block_id, (ref, cached, holders) in sorted(bm.snapshot().items()):
                out.blocks.add(block_id=block_id, ref_count=ref, cached=cached, request_ids=holders)
        return out
