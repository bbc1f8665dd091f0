"""GrpcExecutor: the gRPC implementation of engine_core's Executor interface.

The scheduler cannot tell it from LocalExecutor. One bidirectional Step stream stays open; each
execute() sends a StepBatch on it and waits for the matching StepResult. For async scheduling,
`submit()` / `get_result()` split that in two, so step N+1 can be sent while step N runs (results
come back in submission order).

Any failure (executor process gone, step rejected, timeout) raises ExecutorError (a
GrpcExecutorError with the gRPC status code) and drops the stream; the next submit opens a new one
(gRPC reconnects the channel by itself), so the scheduler can `reset()` and replay its requests.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from services import convert
from services.gen.pagedserve.v1 import executor_pb2, executor_pb2_grpc
from services.grpc_server import channel_options
from services.internal_auth import InternalSecurity

logger = logging.getLogger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
_CLOSE = object()
_EOF = object()


class GrpcExecutorError(ExecutorError):
    """ExecutorError carrying the gRPC status code (None when no RPC status applies)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _rpc_error(what: str, target: str, e: grpc.RpcError) -> GrpcExecutorError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    name = code.name if code is not None else "UNKNOWN"
    return GrpcExecutorError(f"executor at {target}: {what} failed: {name}: {details}", code)


@dataclass
class StepStats:
    """Counters for benchmarks (bytes only when track_bytes=True)."""

    steps: int = 0
    streams_opened: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_batch_bytes: int = 0
    last_result_bytes: int = 0


class _StepStream:
    """One open Step call: a send queue feeding the request iterator, a reader thread filling results."""

    def __init__(self, stub: executor_pb2_grpc.ExecutorStub, metadata) -> None:
        self._send: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: collections.deque[int] = collections.deque()
        self.call = stub.Step(iter(self._send.get, _CLOSE), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="grpc-executor-step-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for res in self.call:
                self.results.put(res)
        except grpc.RpcError as e:
            self.results.put(e)
        except Exception as e:  # noqa: BLE001
            self.results.put(e)
        self.results.put(_EOF)

    def send(self, batch: executor_pb2.StepBatch) -> None:
        self._send.put(batch)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.call.cancel()
        self._send.put(_CLOSE)  # half-close (and unblock gRPC's request-consumer thread)

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)


class GrpcExecutor(Executor):
    """Executor over gRPC.

    Args:
        target: "host:port" of a `python -m services.executor`.
        wait_ready_s: block in the constructor until the executor's health is SERVING (its model
            loaded), at most this long; None: don't wait.
        step_timeout_s: how long get_result()/execute() wait for one step before giving up (the
            stream is cancelled and GrpcExecutorError(DEADLINE_EXCEEDED) raised); None: forever.
        rpc_timeout_s: deadline of the unary RPCs (Describe, Reset).
        track_bytes: count serialized bytes per step in `stats` (costs one extra size pass).
        metadata: gRPC metadata sent with every call (e.g. trace context).
        security: the service token / mTLS to present (services/internal_auth.py; default: from the env).

    Not thread-safe: one caller (the scheduler loop) drives it.
    """

    def __init__(self, target: str, *, wait_ready_s: float | None = 60.0, step_timeout_s: float | None = 300.0,
                 rpc_timeout_s: float = 30.0, track_bytes: bool = False,
                 metadata: list[tuple[str, str]] | None = None,
                 channel: grpc.Channel | None = None, security: InternalSecurity | None = None) -> None:
        self.target = target
        self.step_timeout_s = step_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.track_bytes = track_bytes
        self.metadata = metadata
        self._channel = channel or (security or InternalSecurity.from_env()).channel(target, channel_options())
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stream: _StepStream | None = None
        self.stats = StepStats()
        self._closed = False
        if wait_ready_s is not None:
            self.wait_ready(wait_ready_s)

    # ------------------------------------------------------------------ health
    def health(self, timeout: float = 2.0) -> str:
        """The executor's health status name: SERVING, NOT_SERVING, ... or UNREACHABLE."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float) -> None:
        """Wait until health is SERVING; GrpcExecutorError(UNAVAILABLE) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while True:
            status = self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if status == "SERVING":
                return
            if time.monotonic() >= deadline:
                raise GrpcExecutorError(f"executor at {self.target} not ready after {timeout:.1f}s "
                                        f"(health: {status})", grpc.StatusCode.UNAVAILABLE)
            time.sleep(0.05)

    # ------------------------------------------------------------------ Executor interface
    def describe(self) -> ExecutorInfo:
        try:
            msg = self._stub.Describe(executor_pb2.DescribeRequest(), timeout=self.rpc_timeout_s,
                                      metadata=self.metadata)
        except grpc.RpcError as e:
            raise _rpc_error("Describe", self.target, e) from None
        return convert.executor_info_from_proto(msg)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.num_in_flight:
            raise RuntimeError(f"execute() with {self.num_in_flight} submitted steps in flight; use get_result()")
        self.submit(scheduler_output)
        return self.get_result()

    def reset(self) -> None:
        """Forget every request on the executor (steps still in flight are abandoned first)."""
        if self.num_in_flight:
            self._drop_stream(cancel=True)
        try:
            self._stub.Reset(executor_pb2.ResetRequest(), timeout=self.rpc_timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _rpc_error("Reset", self.target, e) from None

    def shutdown(self) -> None:
        """Close the stream and the channel (the executor process keeps running)."""
        if self._closed:
            return
        self._closed = True
        self._drop_stream(cancel=bool(self.num_in_flight))
        self._channel.close()

    # ------------------------------------------------------------------ async scheduling
    @property
    def max_concurrent_batches(self) -> int:
        # Two steps keep the device busy; a third covers the gRPC round trip and the other
        # process's conversion work (the executor service materializes older steps itself).
        return 3

    def abandon_in_flight(self) -> None:
        if self.num_in_flight:
            self._drop_stream(cancel=True)

    @property
    def num_in_flight(self) -> int:
        return len(self._stream.pending) if self._stream is not None else 0

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        """Send one step without waiting for its result (results come back in submission order)."""
        if self._closed:
            raise GrpcExecutorError(f"executor client for {self.target} is shut down")
        batch = convert.scheduler_output_to_proto(scheduler_output)
        if self._stream is None:
            self._stream = _StepStream(self._stub, self.metadata)
            self.stats.streams_opened += 1
        if self.track_bytes:
            n = batch.ByteSize()
            self.stats.last_batch_bytes = n
            self.stats.bytes_sent += n
        self._stream.pending.append(batch.step_id)
        self._stream.send(batch)

    @property
    def supports_deferred_bitmasks(self) -> bool:
        return True

    def provide_bitmasks(self, step_id: int, bitmasks: dict) -> None:
        """The deferred grammar bitmasks of a submitted step, on the same stream (after the step)."""
        if self._stream is None or step_id not in self._stream.pending:
            raise GrpcExecutorError(f"executor at {self.target}: step {step_id} is not in flight")
        msg = convert.deferred_bitmasks_to_proto(step_id, bitmasks)
        if self.track_bytes:
            self.stats.bytes_sent += msg.ByteSize()
        self._stream.send(msg)

    def get_result(self, timeout: float | None = None) -> ModelRunnerOutput:
        """The result of the oldest submitted step. Raises GrpcExecutorError on any failure (every
        other in-flight step is then lost too: the stream is dropped)."""
        stream = self._stream
        if stream is None or not stream.pending:
            raise RuntimeError("get_result() without a submitted step")
        timeout = self.step_timeout_s if timeout is None else timeout
        want = stream.pending[0]
        try:
            item = stream.results.get(timeout=timeout)
        except queue.Empty:
            self._drop_stream(cancel=True)
            raise GrpcExecutorError(f"executor at {self.target}: step {want} got no result within {timeout:.1f}s",
                                    grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if isinstance(item, grpc.RpcError):
            self._drop_stream(cancel=False)
            raise _rpc_error(f"step {want}", self.target, item) from None
        if isinstance(item, BaseException):
            self._drop_stream(cancel=True)
            raise GrpcExecutorError(f"executor at {self.target}: step {want} failed: {item!r}") from item
        if item is _EOF:
            self._drop_stream(cancel=False)
            raise GrpcExecutorError(f"executor at {self.target} closed the step stream with step {want} pending",
                                    grpc.StatusCode.UNAVAILABLE)
        stream.pending.popleft()
        if item.step_id != want:
            self._drop_stream(cancel=True)
            raise GrpcExecutorError(f"executor at {self.target}: got the result of step {item.step_id}, "
                                    f"expected step {want} (out of sync)", grpc.StatusCode.INTERNAL)
        self.stats.steps += 1
        if self.track_bytes:
            n = item.ByteSize()
            self.stats.last_result_bytes = n
            self.stats.bytes_received += n
        return convert.model_runner_output_from_proto(item)

    def _drop_stream(self, cancel: bool) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.close(cancel=cancel)
        stream.join(timeout=1.0 if not cancel else 0.2)

    def __enter__(self) -> GrpcExecutor:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"GrpcExecutor({self.target!r})"
