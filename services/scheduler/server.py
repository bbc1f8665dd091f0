"""`python -m services.scheduler`: pagedserve.v1.Scheduler over engine_core's EngineCore.

Token ids in, token ids out: the scheduler and block manager of engine_core drive one executor,
remote (`--executor-address host:port`, a `python -m services.executor`, through GrpcExecutor) or
in-process (`--executor-address local`: LocalExecutor, or any `--executor module:callable`).

An asyncio gRPC server; the EngineCore lives on one engine thread (services/scheduler/engine_loop.py),
which hands each step's outputs to the event loop in one callback, grouped by sink
(services/scheduler/sinks.py): a GenerateStream (a gateway worker: one message per step for all its
requests) or a Generate call (the per-request RPC, fanned out from the same step batch).
Status codes are documented in protos/pagedserve/v1/scheduler.proto.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
from collections.abc import Callable

import grpc

from engine_core.config import EngineConfig
from engine_core.executor.base import Executor, ExecutorError
from engine_core.sampling_params import SamplingParams
from services import convert, tracing
from services.gen.pagedserve.v1 import admin_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.grpc_server import (
    EXECUTOR_PORT,
    SCHEDULER_PORT,
    AioGrpcServer,
    add_common_args,
    configure_logging,
)
from services.internal_auth import InternalSecurity, security_from_args_or_log
from services.scheduler.calls import scheduling_error, scheduling_of
from services.scheduler.engine_loop import EngineLoop, GenerateCall
from services.scheduler.sinks import CallFailed, CallSink, StreamSink

logger = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
DEFAULT_LOCAL_EXECUTOR = "engine_core.executor:make_executor"  # LocalExecutor; MultiprocExecutor for TP > 1
DEFAULT_MAX_QUEUE_LEN = 1024
STATS_TIMEOUT_S = 2.0  # a stats request waits at most this long for the engine thread (mid-step)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, engine: EngineLoop) -> None:
        self.engine = engine
        self._calls: dict[str, GenerateCall] = {}  # in-flight Generate calls by request_id
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Shutdown: refuse new calls, end WatchStats streams (in-flight Generate calls get the grace)."""
        self._closing.set()

    def _queue_full(self, n: int) -> bool:
        """Would the samples that have to wait (the queue plus this request's n, less the free
        sequence slots) exceed --max-queue-len?"""
        waiting, running = self.engine.queue_estimate()
        free_slots = max(0, self.engine.config.max_num_seqs - running)
        return waiting + n - free_slots > self.engine.max_queue_len

    # ------------------------------------------------------------------ Generate
    async def Generate(self, request: scheduler_pb2.GenerateRequest, context):
        span = tracing.server_span(context, "scheduler.Generate",
                                   {"pagedserve.request_id": request.request_id,
                                    "pagedserve.prompt_tokens": len(request.prompt_token_ids)})
        gen = self._generate(request, context, span)
        try:
            async for msg in gen:
                yield msg
        except BaseException as e:
            if not isinstance(e, GeneratorExit | asyncio.CancelledError):
                span.set_error(e)
            raise
        finally:
            await gen.aclose()  # its finally aborts the request in the engine now, not at GC time
            span.end()

    def _check(self, request: scheduler_pb2.GenerateRequest) -> SamplingParams | CallFailed:
        """The request's sampling params, or why it cannot be admitted (before the engine sees it)."""
        engine = self.engine
        rid = request.request_id
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if self._closing.is_set():
            return CallFailed(grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down")
        if engine.fatal_error is not None:
            return CallFailed(grpc.StatusCode.UNAVAILABLE, f"the scheduler engine failed: {engine.fatal_error}")
        if not rid:
            return CallFailed(bad, "request_id is required")
        if rid in self._calls:
            return CallFailed(bad, f"request_id {rid!r} is already in flight")
        if not request.prompt_token_ids:
            return CallFailed(bad, "prompt is empty: at least one token is required")
        try:
            params = (convert.sampling_params_from_proto(request.sampling_params)
                      if request.HasField("sampling_params") else SamplingParams())
        except (ValueError, TypeError) as e:
            return CallFailed(bad, f"sampling_params: {e}")
        why = scheduling_error(request, engine.config.scheduling_policy)
        if why is not None:
            return CallFailed(bad, why)
        down = engine.down_for()
        if down > engine.executor_timeout_s:
            return CallFailed(grpc.StatusCode.UNAVAILABLE,
                              f"executor {engine.executor_name} unavailable for {down:.0f}s ({engine.down_reason})")
        limit = engine.max_queue_len
        if limit and params.n > limit + engine.config.max_num_seqs:  # no retry could ever admit it
            return CallFailed(bad, f"n={params.n} is more samples than the scheduler can ever hold "
                                   f"(--max-queue-len {limit} + --max-num-seqs {engine.config.max_num_seqs})")
        if limit and self._queue_full(params.n):
            engine.num_rejected += 1
            return CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the scheduler's waiting queue is full ({limit} requests); retry later")
        return params

    async def _check_and_compile(self, request: scheduler_pb2.GenerateRequest):
        """(params, compiled grammar) or CallFailed: `_check`, then the structured-output grammar
        compiled in a worker thread while the request waits (never on the engine thread, so no step
        stalls). The grammar is None without a constraint (or with no engine yet: add_request then
        compiles). An invalid schema / regex / grammar fails here, before any compute."""
        params = self._check(request)
        if isinstance(params, CallFailed) or params.structured_outputs is None:
            return params if isinstance(params, CallFailed) else (params, None)
        try:
            compiled = await asyncio.get_running_loop().run_in_executor(None, self.engine.compile_grammar, params)
        except ValueError as e:
            return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"structured_outputs: {e}")
        return params, compiled

    def _submit(self, call: GenerateCall, span: tracing.server_span) -> None:
        if tracing.span_is_sampled(span.span):
            call.trace_context = tracing.carrier(span.context)
        self._calls[call.request_id] = call
        self.engine.add(call)

    def _forget(self, call: GenerateCall) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]

    async def _generate(self, request: scheduler_pb2.GenerateRequest, context, span: tracing.server_span):
        engine = self.engine
        checked = await self._check_and_compile(request)
        if isinstance(checked, CallFailed):
            await context.abort(checked.code, checked.message)
        params, compiled = checked
        sink = CallSink(asyncio.get_running_loop())
        call = GenerateCall(request.request_id, list(request.prompt_token_ids), params, sink,
                            compiled_grammar=compiled, **scheduling_of(request))
        try:
            self._submit(call, span)
            verdict = await sink.accepted
            if isinstance(verdict, CallFailed):
                call.done = True
                await context.abort(verdict.code, verdict.message)
            remaining = params.n
            while remaining:
                item = await sink.next()
                if isinstance(item, CallFailed):
                    call.done = True
                    await context.abort(item.code, item.message)
                if item.finish_reason != scheduler_pb2.FINISH_REASON_UNSPECIFIED:
                    remaining -= 1
                    if span.span is not None:
                        _request_spans(span, call, item)
                yield item
            call.done = True
        finally:
            # A cancelled call (client gone, deadline, shutdown) or a failed write: abort in the
            # engine, which frees the blocks at once (idempotent for finished samples).
            if not call.done:
                engine.abort(call.child_ids)
            self._forget(call)

    # ------------------------------------------------------------------ GenerateStream
    async def GenerateStream(self, request_iterator, context):
        """Many requests on one stream; one message per engine step (see the proto)."""
        calls: dict[int, GenerateCall] = {}

        def on_done(call: GenerateCall) -> None:
            call.done = True
            if calls.get(call.key) is call:
                del calls[call.key]
            self._forget(call)
            if call.span is not None:
                call.span.end()

        def on_final(call: GenerateCall, msg: scheduler_pb2.GenerateResponse) -> None:
            if call.span is not None:
                _request_spans(call.span, call, msg)

        sink = StreamSink(on_done, on_final)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, sink, calls))
        try:
            while not (reader.done() and not calls):
                msg = await sink.next_message()
                if msg.ByteSize():
                    yield msg
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()
        finally:
            reader.cancel()
            live = [c for c in calls.values() if not c.done]
            if live:  # the client is gone (or the stream failed): free every request still on it
                self.engine.abort([cid for c in live for cid in c.child_ids])
            for c in live:
                on_done(c)

    async def _read_stream(self, request_iterator, sink: StreamSink,
                           calls: dict[int, GenerateCall]) -> None:
        try:
            async for req in request_iterator:
                for add in req.add:
                    await self._stream_add(add, sink, calls)
                for ab in req.abort:
                    call = calls.get(ab.key)
                    if call is None or call.done:
                        continue
                    ids = call.child_ids
                    if ab.indices:
                        ids = [ids[i] for i in ab.indices if 0 <= i < call.n]
                    self.engine.abort(ids, ab.stop_str if ab.HasField("stop_str") else None)
        finally:
            sink.wake()  # the writer re-checks whether the stream is over

    async def _stream_add(self, add: scheduler_pb2.StreamAdd, sink: StreamSink,
                          calls: dict[int, GenerateCall]) -> None:
        request = add.request
        # x-request-id is left out: server_span would set it as the reader task's log context.
        md = {k: v for k, v in add.trace_context.items() if k != tracing.REQUEST_ID_METADATA_KEY}
        span = tracing.server_span(_MetadataContext(md), "scheduler.Generate",
                                   {"pagedserve.request_id": request.request_id,
                                    "pagedserve.prompt_tokens": len(request.prompt_token_ids)})
        checked = await self._check_and_compile(request)
        if not isinstance(checked, CallFailed) and add.key in calls:
            checked = CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"stream key {add.key} is already in use")
        if isinstance(checked, CallFailed):
            span.end()
            sink.admitted(GenerateCall(request.request_id, [], SamplingParams(), sink, key=add.key), checked)
            return
        params, compiled = checked
        call = GenerateCall(request.request_id, list(request.prompt_token_ids), params, sink, key=add.key,
                            span=span if span.span is not None else None, compiled_grammar=compiled,
                            **scheduling_of(request))
        if call.span is None:
            span.end()
        calls[add.key] = call
        self._submit(call, span)

    # ------------------------------------------------------------------ Abort
    async def Abort(self, request: scheduler_pb2.AbortRequest, context):
        stop_str = request.stop_str if request.HasField("stop_str") else None
        aborted, unknown, ids = [], [], []
        for rid in request.request_ids:
            call = self._calls.get(rid)
            if call is None or call.done:
                unknown.append(rid)
                continue
            aborted.append(rid)
            all_ids = call.child_ids
            if request.indices:
                bad = [i for i in request.indices if not 0 <= i < call.n]
                if bad:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"indices: {bad[0]} is out of range for request {rid!r} (n={call.n})")
                ids.extend(all_ids[i] for i in request.indices)
            else:
                ids.extend(all_ids)
        if ids:
            self.engine.abort(ids, stop_str)
        return scheduler_pb2.AbortResponse(aborted_request_ids=aborted, unknown_request_ids=unknown)

    # ------------------------------------------------------------------ stats
    async def _stats(self, include_requests: bool) -> scheduler_pb2.SchedulerStats:
        fut = asyncio.get_running_loop().create_future()
        self.engine.request_stats(include_requests, fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), STATS_TIMEOUT_S)
        except TimeoutError:  # the engine thread is inside a long step: the last published numbers
            stats = scheduler_pb2.SchedulerStats()
            stats.CopyFrom(self.engine.last_stats)
            return stats

    async def GetStats(self, request, context):
        return await self._stats(request.include_requests)

    async def WatchStats(self, request, context):
        interval = max(0.05, request.interval_s or 1.0)
        while not self._closing.is_set():
            yield await self._stats(request.include_requests)
            try:
                await asyncio.wait_for(self._closing.wait(), interval)
            except TimeoutError:
                pass

    async def GetModelInfo(self, request, context):
        info = self.engine.info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"not connected to executor {self.engine.executor_name} yet")
        cfg = self.engine.config
        return scheduler_pb2.ModelInfo(
            executor=convert.executor_info_to_proto(info), max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens or 0,
            enable_chunked_prefill=cfg.enable_chunked_prefill, enable_prefix_caching=cfg.enable_prefix_caching,
            max_logprobs=cfg.max_logprobs)


class _MetadataContext:
    """What tracing.server_span reads from a grpc context, for a request that came in on a stream."""

    def __init__(self, metadata) -> None:
        self._md = tuple(metadata.items())

    def invocation_metadata(self):
        return self._md


def _request_spans(span: tracing.server_span, call: GenerateCall, final: scheduler_pb2.GenerateResponse) -> None:
    """queue / prefill / decode (aggregated) spans of one finished sample, from its timings."""
    m = final.metrics
    t0 = call.submitted
    attrs = {"pagedserve.sample_index": final.index}
    queue_end = t0 + m.queue_time_s
    first_token = t0 + m.time_to_first_token_s if m.time_to_first_token_s else None
    end = t0 + m.e2e_latency_s
    parent = span.context
    tracing.record_span("queue", parent, tracing.mono_to_ns(t0), tracing.mono_to_ns(queue_end if m.queue_time_s
                                                                                    else end), attrs)
    if first_token is None:
        return
    tracing.record_span("prefill", parent, tracing.mono_to_ns(queue_end), tracing.mono_to_ns(first_token),
                        {**attrs, "pagedserve.prompt_tokens": final.usage.prompt_tokens,
                         "pagedserve.cached_tokens": final.usage.cached_tokens})
    tracing.record_span("decode", parent, tracing.mono_to_ns(first_token), tracing.mono_to_ns(end),
                        {**attrs, "pagedserve.completion_tokens": final.usage.completion_tokens,
                         "pagedserve.num_preemptions": m.num_preemptions,
                         "pagedserve.finish_reason": scheduler_pb2.FinishReason.Name(final.finish_reason)})


class GuardedExecutor(Executor):
    """An in-process executor whose failures look like a remote one's: any exception from a step
    becomes an ExecutorError (replayed, then failed after repeated failures) instead of killing
    the engine thread."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def describe(self):
        return self.inner.describe()

    def execute(self, scheduler_output):
        return self._guard(self.inner.execute, scheduler_output)

    def submit(self, scheduler_output) -> None:
        self._guard(self.inner.submit, scheduler_output)

    def get_result(self):
        return self._guard(self.inner.get_result)

    def abandon_in_flight(self) -> None:
        self.inner.abandon_in_flight()

    @property
    def max_concurrent_batches(self) -> int:
        return self.inner.max_concurrent_batches

    @staticmethod
    def _guard(fn, *args):
        try:
            return fn(*args)
        except ExecutorError:
            raise
        except Exception as e:
            logger.exception("executor step failed")
            raise ExecutorError(f"executor step failed: {type(e).__name__}: {e}") from e

    def reset(self) -> None:
        self.inner.reset()

    def shutdown(self) -> None:
        self.inner.shutdown()

    def __getattr__(self, name):  # e.g. LocalExecutor.source
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------- CLI
def _load_factory(spec: str) -> Callable[..., Executor]:
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ValueError(f"--executor must be 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(mod), attr)


def executor_factory(args: argparse.Namespace, security: InternalSecurity | None = None
                     ) -> tuple[Callable[[EngineConfig], Executor], str]:
    """(config -> Executor, a name for logs) from --executor-address / --executor."""
    address = args.executor_address
    if address == "local":
        factory = _load_factory(args.executor)
        return (lambda config: GuardedExecutor(factory(config))), f"local ({args.executor})"
    connect = executor_connector(args.step_timeout, security)
    return (lambda _config: connect(address)), address


def executor_connector(step_timeout_s: float, security: InternalSecurity | None = None
                       ) -> Callable[[str], Executor]:
    """address -> a GrpcExecutor client of the executor service there (also what SwapExecutor uses)."""
    from services.executor_client import GrpcExecutor

    step_timeout = step_timeout_s if step_timeout_s > 0 else None
    return lambda address: GrpcExecutor(address, wait_ready_s=None, step_timeout_s=step_timeout, security=security)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.scheduler",
        description="pagedserve scheduler service: queues, paged KV block manager, continuous batching")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model (only with --executor-address local)")
    p.add_argument("--model", default=None, help="model for an in-process executor (--executor-address local)")
    g = p.add_argument_group("executor")
    g.add_argument("--executor-address", default=f"127.0.0.1:{EXECUTOR_PORT}",
                   help=f"host:port of the executor service (default 127.0.0.1:{EXECUTOR_PORT}); "
                        "'local': run the executor in this process (tests, development)")
    g.add_argument("--executor", default=DEFAULT_LOCAL_EXECUTOR,
                   help="with --executor-address local: Executor factory 'module:callable' called with the "
                        f"EngineConfig (default {DEFAULT_LOCAL_EXECUTOR})")
    g.add_argument("--executor-timeout", type=float, default=30.0,
                   help="seconds a request waits for an unavailable executor before failing with UNAVAILABLE "
                        "(it is replayed if the executor comes back sooner; default 30)")
    g.add_argument("--step-timeout", type=float, default=120.0,
                   help="seconds one step may take before the executor counts as hung (0: no limit; default 120)")
    g = p.add_argument_group("admission")
    g.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN,
                   help="waiting requests (samples) beyond which Generate answers RESOURCE_EXHAUSTED "
                        f"(HTTP 429 at the gateway); 0: unlimited (default {DEFAULT_MAX_QUEUE_LEN})")
    EngineConfig.add_cli_args(p.add_argument_group("engine (scheduling flags; model flags apply to a local executor)"))
    add_common_args(p, SCHEDULER_PORT)
    return p


class SchedulerService:
    """The scheduler gRPC server + its engine thread, inside a running event loop::

        svc = SchedulerService(config, factory, port=0)
        await svc.start()        # listening; SERVING once the executor is connected
        ...
        await svc.stop(grace)    # or svc.server.stop() from a signal, then await svc.wait()
    """

    def __init__(self, config: EngineConfig, make_executor: Callable[[EngineConfig], Executor], *,
                 executor_name: str = "executor", host: str = "127.0.0.1", port: int = 0,
                 executor_timeout_s: float = 30.0, max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
                 grace_s: float = 5.0, security: InternalSecurity | None = None, reflection: bool = False,
                 connect_executor: Callable[[str], Executor] | None = None) -> None:
        from services.scheduler.admin import SERVICE_NAME as ADMIN_SERVICE
        from services.scheduler.admin import SchedulerAdminServicer

        security = security or InternalSecurity.from_env()
        self.engine = EngineLoop(config, make_executor, executor_name=executor_name,
                                 executor_timeout_s=executor_timeout_s, max_queue_len=max_queue_len)
        self.server = AioGrpcServer("scheduler", [SERVICE_NAME, ADMIN_SERVICE], host, port, grace_s=grace_s,
                                    security=security, reflection=reflection)
        self.servicer = SchedulerServicer(self.engine)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.server.server)
        admin_pb2_grpc.add_SchedulerAdminServicer_to_server(
            SchedulerAdminServicer(self.engine, connect_executor or executor_connector(0, security), security),
            self.server.server)
        self.server.on_shutdown(self.servicer.close)
        self.fatal: list[BaseException] = []

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        srv = self.server
        await srv.start()  # NOT_SERVING until the executor is connected

        def on_health(serving: bool) -> None:
            if not srv.stopping:
                loop.create_task(srv.set_serving(serving))
                logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")

        def on_fatal(e: BaseException) -> None:
            self.fatal.append(e)
            srv.stop(0)

        self.engine.start(loop, on_health, on_fatal)

    async def wait(self) -> None:
        """Until the server has stopped; then stops the engine thread (and the executor client)."""
        await self.server.wait()
        await asyncio.to_thread(self.engine.stop)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        await self.wait()


async def serve(args: argparse.Namespace) -> int:
    security = security_from_args_or_log(args, logger)
    if security is None:
        return 2
    try:
        config = EngineConfig.from_cli_args(args, model=args.model or args.model_pos)
        factory, executor_name = executor_factory(args, security)
    except (ValueError, ImportError, AttributeError) as e:
        logger.error("bad arguments: %s", e)
        return 2
    if args.max_queue_len < 0:
        logger.error("bad arguments: --max-queue-len must be >= 0")
        return 2
    svc = SchedulerService(config, factory, executor_name=executor_name, host=args.host, port=args.port,
                           connect_executor=executor_connector(args.step_timeout, security),
                           executor_timeout_s=args.executor_timeout, max_queue_len=args.max_queue_len,
                           grace_s=args.shutdown_grace, security=security, reflection=args.grpc_reflection)
    tracing.setup_tracing("scheduler")
    if args.metrics_port is not None:
        from services.metrics import SchedulerMetrics, maybe_start_metrics_server

        metrics = SchedulerMetrics.get()
        metrics.bind(svc.engine)
        svc.engine.metrics = metrics
    svc.server.install_signal_handlers()
    await svc.start()
    if args.metrics_port is not None:
        try:
            maybe_start_metrics_server("scheduler", args)
        except OSError as e:
            logger.error("could not serve metrics on port %s: %s", args.metrics_port, e)
            await svc.stop(0)
            return 1
    logger.info("scheduler: executor %s, max_num_seqs %d, max_queue_len %s, executor timeout %.0fs",
                executor_name, config.max_num_seqs, args.max_queue_len or "unlimited", args.executor_timeout)
    await svc.wait()
    logger.info("scheduler stopped")
    return 1 if svc.fatal else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, "scheduler")
    return asyncio.run(serve(args))
