"""`python -m services.executor`: serve an engine_core Executor over gRPC (by default make_executor:
LocalExecutor, or MultiprocExecutor with one worker process per GPU for --tensor-parallel-size N > 1).

Every executor call (construction included) runs on one dedicated thread, so thread-local state
(torch grad mode, the current CUDA device and stream) is the same for loading and for every step,
and steps from any gRPC handler thread are serialized.

Status codes: INVALID_ARGUMENT for a malformed batch (structure, ids out of range, or a ValueError
from the executor), FAILED_PRECONDITION when the batch does not match the executor's state
(ExecutorError: out of sync), INTERNAL for any other executor failure (the message says what
failed), UNAVAILABLE while loading or shutting down. A failed step ends that Step stream; the
process keeps serving.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from services import convert, tracing
from services.gen.pagedserve.v1 import executor_pb2, executor_pb2_grpc
from services.grpc_server import (
    EXECUTOR_PORT,
    GrpcServer,
    add_common_args,
    configure_logging,
)
from services.internal_auth import security_from_args_or_log

logger = logging.getLogger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
DEFAULT_EXECUTOR = "engine_core.executor:make_executor"  # LocalExecutor; MultiprocExecutor for TP > 1
_EOF = object()


def _describe_error(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, ExecutorError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    return grpc.StatusCode.INTERNAL, f"executor failed: {type(e).__name__}: {e}"


class _TracedRequest:
    """A traced request's executor-side timeline: one `executor.prefill` span (first step that has
    it -> the step that sampled its first token) and one aggregated `executor.decode` span (-> the
    end of the last step it was in), with step counts and the executor time it shared. The decode
    span is exported when the executor learns the request is gone: the next StepBatch's
    finished_req_ids (or a Reset / shutdown), so after the last request of a burst it waits for
    the next step; its times are those of the steps it ran in."""

    __slots__ = ("busy_s", "context", "decode_start_ns", "last_end_ns", "prefill_start_ns", "prefill_steps",
                 "steps", "tokens")

    def __init__(self, context, start_ns: int) -> None:
        self.context = context
        self.prefill_start_ns = start_ns
        self.decode_start_ns: int | None = None
        self.prefill_steps = 0
        self.last_end_ns = start_ns
        self.steps = 0
        self.tokens = 0
        self.busy_s = 0.0


class StepTracer:
    """Per-request executor spans for requests whose NewRequestData carries a trace context."""

    def __init__(self) -> None:
        self._reqs: dict[str, _TracedRequest] = {}
        self._lock = threading.Lock()  # steps run on a handler thread; reset() may come from another

    def _end(self, rid: str, end_ns: int, reason: str) -> None:
        t = self._reqs.pop(rid, None)
        if t is None or t.decode_start_ns is None:
            return
        tracing.record_span("executor.decode", t.context, t.decode_start_ns, t.last_end_ns,
                            {"pagedserve.request_id": rid, "pagedserve.decode_steps": t.steps,
                             "pagedserve.completion_tokens": t.tokens,
                             "pagedserve.executor_busy_s": round(t.busy_s, 6), "pagedserve.end": reason})

    def before(self, so, start_ns: int) -> None:
        with self._lock:
            self._before(so, start_ns)

    def _before(self, so, start_ns: int) -> None:
        for rid in so.finished_req_ids:
            if rid in self._reqs:
                self._end(rid, start_ns, "finished")
        for r in so.scheduled_new_reqs:
            if r.trace_context:
                ctx = tracing.context_from_carrier(r.trace_context)
                self._reqs[r.req_id] = _TracedRequest(ctx, start_ns)

    def after(self, so, out, seconds: float, end_ns: int) -> None:
        if not self._reqs:
            return
        with self._lock:
            self._after(so, out, seconds, end_ns)

    def _after(self, so, out, seconds: float, end_ns: int) -> None:
        sampled = dict(zip(out.req_ids, out.sampled_token_ids))
        for rid in so.num_scheduled_tokens:
            t = self._reqs.get(rid)
            if t is None:
                continue
            toks = sampled.get(rid) or ()
            t.last_end_ns = end_ns
            if t.decode_start_ns is None:
                t.prefill_steps += 1
                if toks:  # the first token: prefill done
                    tracing.record_span("executor.prefill", t.context, t.prefill_start_ns, end_ns,
                                        {"pagedserve.request_id": rid, "pagedserve.prefill_steps": t.prefill_steps,
                                         "pagedserve.batch_tokens": so.total_num_scheduled_tokens})
                    t.decode_start_ns = end_ns
                    t.tokens += len(toks)
            else:
                t.steps += 1
                t.busy_s += seconds
                t.tokens += len(toks)

    def reset(self) -> None:
        now = time.time_ns()
        with self._lock:
            for rid in list(self._reqs):
                self._end(rid, now, "reset")


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    """pagedserve.v1.Executor over an engine_core Executor.

    `load(factory)` builds the executor on the executor thread; until then every RPC answers
    UNAVAILABLE. Or pass a ready `executor` (it is then also called from the executor thread).
    """

    def __init__(self, executor: Executor | None = None) -> None:
        # The executor's home thread (module docstring).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor")
        self._executor: Executor | None = None
        self._info: ExecutorInfo | None = None
        self._info_pb: executor_pb2.ExecutorInfo | None = None
        self._closing = threading.Event()
        self._streams: set[queue.SimpleQueue] = set()
        self._streams_lock = threading.Lock()
        self.metrics = None  # services.metrics.ExecutorMetrics when --metrics-port is on
        self._held: set[str] = set()  # requests with executor state (for the metrics)
        self._tracer = StepTracer()
        if executor is not None:
            self.load(lambda: executor)

    # ------------------------------------------------------------------ lifecycle
    def load(self, factory: Callable[[], Executor]) -> ExecutorInfo:
        def build() -> tuple[Executor, ExecutorInfo]:
            ex = factory()
            return ex, ex.describe()

        ex, info = self._thread.submit(build).result()
        self._info, self._info_pb = info, convert.executor_info_to_proto(info)
        if self.metrics is not None:
            self.metrics.set_info(info)
        self._executor = ex
        return info

    @property
    def ready(self) -> bool:
        return self._executor is not None and not self._closing.is_set()

    def close_streams(self) -> None:
        """Shutdown: every Step stream ends (UNAVAILABLE) once its current step is answered."""
        self._closing.set()
        self._tracer.reset()
        with self._streams_lock:
            for q in self._streams:
                q.put(_EOF)

    def shutdown_executor(self, timeout: float = 30.0) -> None:
        if self._executor is not None:
            try:
                self._thread.submit(self._executor.shutdown).result(timeout)
            except Exception:
                logger.exception("executor shutdown failed")
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _check_ready(self, context: grpc.ServicerContext) -> None:
        if self._closing.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "executor service is shutting down")
        if self._executor is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "executor is still loading the model")

    # ------------------------------------------------------------------ RPCs
    def Describe(self, request, context):
        self._check_ready(context)
        return self._info_pb

    def Reset(self, request, context):
        self._check_ready(context)
        self._held.clear()
        self._tracer.reset()
        try:
            self._thread.submit(self._executor.reset).result()
        except Exception as e:
            logger.exception("executor reset failed")
            code, msg = _describe_error(e)
            context.abort(code, f"reset: {msg}")
        return executor_pb2.ResetResponse()

    def Step(self, request_iterator: Iterator[executor_pb2.StepBatch], context) -> Iterator[executor_pb2.StepResult]:
        """Pipelined: a reader thread validates each batch and submits it to the executor thread
        as soon as it arrives (the executor starts its device work and returns), while a result
        thread waits for the oldest step's device work and queues its StepResult. So step N+1's
        input preparation overlaps step N on the device, and no step waits for gRPC or the
        result conversion of the one before it."""
        self._check_ready(context)
        tickets: queue.SimpleQueue = queue.SimpleQueue()  # submitted steps in order, an error, or _EOF
        outbox: queue.SimpleQueue = queue.SimpleQueue()  # StepResults in order, an error, or _EOF
        ended = threading.Event()

        def reader() -> None:
            try:
                for batch in request_iterator:
                    if ended.is_set():
                        break
                    if batch.HasField("deferred_bitmasks"):  # a bitmasks_deferred step's bitmasks
                        try:
                            masks = convert.deferred_bitmasks_from_proto(batch, self._info.vocab_size)
                        except ValueError as e:
                            tickets.put((grpc.StatusCode.INVALID_ARGUMENT, f"malformed bitmasks: {e}"))
                            break
                        # Queued behind the step's submit on the executor thread; a failure shows
                        # up as that step's get_result error.
                        self._thread.submit(self._executor.provide_bitmasks, batch.step_id, masks)
                        continue
                    try:
                        so = convert.scheduler_output_from_proto(batch)
                        convert.check_step_against_info(so, self._info)
                    except ValueError as e:
                        tickets.put((grpc.StatusCode.INVALID_ARGUMENT, f"malformed step {batch.step_id}: {e}"))
                        break
                    if tracing.enabled():
                        self._tracer.before(so, time.time_ns())
                    tickets.put((so, self._thread.submit(self._executor.submit, so), time.perf_counter()))
            except Exception as e:  # noqa: BLE001 - the call ended (cancelled / peer gone)
                logger.debug("step stream ended: %r", e)
            tickets.put(_EOF)

        def resulter() -> None:
            while True:
                item = tickets.get()
                if item is _EOF or isinstance(item[0], grpc.StatusCode):
                    outbox.put(item)
                    return
                so, submitted, t0 = item
                try:
                    submitted.result()
                    out = self._executor.get_result()  # waits for the device here, not on the executor thread
                except Exception as e:  # noqa: BLE001 - becomes the stream's status
                    outbox.put(self._step_failed(so.step_id, e))
                    return
                seconds = time.perf_counter() - t0
                if tracing.enabled():
                    self._tracer.after(so, out, seconds, time.time_ns())
                if self.metrics is not None:
                    held = self._held
                    held.difference_update(so.finished_req_ids)
                    held.update(r.req_id for r in so.scheduled_new_reqs)
                    self.metrics.observe_step(seconds, so.total_num_scheduled_tokens, len(so.num_scheduled_tokens),
                                              len(held))
                outbox.put(convert.model_runner_output_to_proto(out))

        with self._streams_lock:
            self._streams.add(tickets)
        threading.Thread(target=reader, name="step-reader", daemon=True).start()
        results = threading.Thread(target=resulter, name="step-results", daemon=True)
        results.start()
        peer = context.peer()
        logger.info("step stream opened by %s", peer)
        try:
            while True:
                item = outbox.get()
                if isinstance(item, executor_pb2.StepResult):
                    yield item
                    continue
                if item is _EOF:
                    if self._closing.is_set():
                        context.abort(grpc.StatusCode.UNAVAILABLE, "executor service is shutting down")
                    return
                if item[0] == grpc.StatusCode.INVALID_ARGUMENT:
                    logger.warning("%s", item[1])
                context.abort(*item)
        finally:
            ended.set()
            with self._streams_lock:
                self._streams.discard(tickets)
            tickets.put(_EOF)
            results.join(timeout=30.0)
            # Steps submitted but never answered (the stream broke): their results must not be
            # handed to the next stream.
            try:
                self._thread.submit(self._executor.abandon_in_flight).result()
            except Exception:
                logger.exception("abandoning in-flight steps failed")
            logger.info("step stream from %s closed", peer)

    def _step_failed(self, step_id: int, e: BaseException) -> tuple[grpc.StatusCode, str]:
        code, msg = _describe_error(e)
        if self.metrics is not None:
            self.metrics.failed(code.name)
        if code == grpc.StatusCode.INTERNAL:
            logger.error("step %d failed", step_id, exc_info=e)
        else:
            logger.warning("step %d rejected: %s", step_id, msg)
        return code, f"step {step_id}: {msg}"


# ---------------------------------------------------------------------------- CLI
def _load_factory(spec: str) -> Callable[..., Executor]:
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ValueError(f"--executor must be 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(mod), attr)


def build_parser() -> argparse.ArgumentParser:
    from engine_core.config import EngineConfig

    p = argparse.ArgumentParser(prog="python -m services.executor",
                                description="pagedserve executor service: model weights, KV cache, forward + sampling")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    p.add_argument("--model", default=None,
                   help="GGUF file, HF model directory, dummy:<config> or 'default' (the embedded SmolLM2)")
    EngineConfig.add_cli_args(p)
    p.add_argument("--executor", default=DEFAULT_EXECUTOR,
                   help=f"Executor factory 'module:callable' called with the EngineConfig (default {DEFAULT_EXECUTOR})")
    add_common_args(p, EXECUTOR_PORT)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine_core.config import EngineConfig

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, "executor")
    model = args.model or args.model_pos
    try:
        config = EngineConfig.from_cli_args(args, model=model)
        factory = _load_factory(args.executor)
    except (ValueError, ImportError, AttributeError) as e:
        logger.error("bad arguments: %s", e)
        return 2

    tracing.setup_tracing("executor")
    servicer = ExecutorServicer()
    security = security_from_args_or_log(args, logger)
    if security is None:
        return 2
    srv = GrpcServer("executor", [SERVICE_NAME], args.host, args.port, max_workers=args.max_workers,
                     grace_s=args.shutdown_grace, security=security, reflection=args.grpc_reflection)
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, srv.server)
    srv.on_shutdown(servicer.close_streams)
    srv.install_signal_handlers()
    srv.start()  # health NOT_SERVING while the model loads
    if args.metrics_port is not None:
        from services.metrics import ExecutorMetrics, maybe_start_metrics_server

        servicer.metrics = ExecutorMetrics.get()
        try:
            maybe_start_metrics_server("executor", args)
        except OSError as e:
            logger.error("could not serve metrics on port %s: %s", args.metrics_port, e)
            srv.stop(0)
            srv.wait()
            return 1

    result: dict = {}

    def do_load() -> None:
        try:
            result["info"] = servicer.load(lambda: factory(config))
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    loader = threading.Thread(target=do_load, name="load", daemon=True)
    loader.start()
    while loader.is_alive() and not srv.stopping:
        loader.join(0.2)
    if srv.stopping:
        srv.wait()
        return 0
    if "error" in result:
        e = result["error"]
        logger.error("could not load the executor: %s: %s", type(e).__name__, e, exc_info=e)
        srv.stop(0)
        srv.wait()
        return 1
    info: ExecutorInfo = result["info"]
    logger.info("executor ready: %s (%s) on %s, %s; %d KV blocks x %d tokens, max_model_len %d",
                info.model_name, info.architecture, info.device, info.dtype, info.num_kv_blocks,
                info.block_size, info.max_model_len)
    srv.set_serving(True)
    srv.wait()
    servicer.shutdown_executor()
    logger.info("executor stopped")
    return 0

