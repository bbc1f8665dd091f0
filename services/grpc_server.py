"""Server boilerplate shared by every pagedserve gRPC service (DESIGN.md §7).

- loopback bind by default, port 0 picks a free port; one line `<name> listening on HOST:PORT` on
  stdout once the port is bound (launchers and tests read it);
- grpc.health.v1 health checking: "" (overall) plus each service name; NOT_SERVING until the service
  calls `set_serving(True)` (e.g. after the model is loaded) and again during shutdown;
- server reflection only with `reflection=True` (`--grpc-reflection`): off by default, it hands
  any caller the full API;
- internal auth (services/internal_auth.py): the service token interceptor and mTLS when configured;
- graceful SIGTERM / SIGINT: health goes NOT_SERVING, `on_shutdown` hooks run (end long streams),
  in-flight RPCs get `grace` seconds, then the process exits 0;
- large message limits (a StepBatch with long prompts is bigger than gRPC's 4 MiB default) and
  keepalive settings that tolerate client pings (so a dead peer is noticed quickly);
- `--log-level` / `--log-format text|json` (structured logs).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.internal_auth import InternalSecurity, add_security_args

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_MESSAGE_BYTES = 256 * 2**20
DEFAULT_GRACE_S = 5.0

# Default ports (scheduler, tokenizer, executor).
SCHEDULER_PORT = 50051
TOKENIZER_PORT = 50052
EXECUTOR_PORT = 50053


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Accept client keepalive pings every >= 5 s, also without active calls.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Client-side options matching `server_options` (use for every pagedserve channel)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a restart of the peer (default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


# ---------------------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any `extra={...}` fields."""

    _STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._STD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text", service: str | None = None) -> None:
    """Root logger to stderr. Every line carries the request it belongs to when there is one
    (services.tracing.REQUEST_ID: text ` [req=<id>]`, JSON `request_id`, plus `trace_id` / `span_id`
    while tracing)."""
    from services.tracing import RequestLogFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestLogFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"{service} " if service else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s%(_req)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def add_common_args(parser: argparse.ArgumentParser, default_port: int) -> argparse.ArgumentParser:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST}: loopback only)")
    g.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0: any free port)")
    g.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads")
    g.add_argument("--shutdown-grace", type=float, default=DEFAULT_GRACE_S,
                   help="seconds in-flight RPCs get on SIGTERM")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-format", default="text", choices=["text", "json"])
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port; default: off)")
    g.add_argument("--metrics-host", default=None, help="bind address of the metrics endpoint (default: --host)")
    g.add_argument("--grpc-reflection", action="store_true",
                   help="enable gRPC server reflection (off by default: it lists the whole API to any caller)")
    add_security_args(parser)
    return parser


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def _enable_reflection(service_names: list[str], server) -> None:
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)


# ---------------------------------------------------------------------------- server
class GrpcServer:
    """A grpc.Server with health, reflection, logging-friendly start and graceful stop.

    Usage::

        srv = GrpcServer("executor", [executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name],
                         host, port)
        executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, srv.server)
        srv.start()                 # NOT_SERVING until set_serving(True)
        ...load...; srv.set_serving(True)
        srv.install_signal_handlers(); srv.wait()
    """

    def __init__(self, name: str, service_names: Iterable[str], host: str = DEFAULT_HOST, port: int = 0, *,
                 max_workers: int = 16, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 grace_s: float = DEFAULT_GRACE_S, security: InternalSecurity | None = None,
                 reflection: bool = False) -> None:
        self.name = name
        self.service_names = list(service_names)
        self.host = host
        self.grace_s = grace_s
        security = security or InternalSecurity.from_env()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-rpc"),
                                  options=server_options(max_message_bytes),
                                  interceptors=security.server_interceptors(aio=False))
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflection:
            _enable_reflection(self.service_names, self.server)
        self.port = security.add_port(self.server, _bind_address(host, port))
        if self.port == 0:
            raise OSError(f"{name}: could not bind {_bind_address(host, port)}")
        self._on_shutdown: list[Callable[[], None]] = []
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.set_serving(False)

    @property
    def address(self) -> str:
        return _bind_address(self.host, self.port)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def on_shutdown(self, fn: Callable[[], None]) -> None:
        """Run `fn` when shutdown starts (before the grace period): end long-lived streams here."""
        self._on_shutdown.append(fn)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", *self.service_names):
            self.health.set(svc, status)

    def start(self) -> None:
        self.server.start()
        logger.info("%s listening on %s", self.name, self.address)
        print(f"{self.name} listening on {self.address}", flush=True)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Begin a graceful stop (idempotent, non-blocking); returns an event set once stopped."""
        if self._stopping.is_set():
            return self._stopped
        self._stopping.set()
        grace = self.grace_s if grace is None else grace
        logger.info("%s shutting down (grace %.1fs)", self.name, grace)
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, no later set() applies
        for fn in self._on_shutdown:
            try:
                fn()
            except Exception:
                logger.exception("shutdown hook failed")
        done = self.server.stop(grace)

        def _wait() -> None:
            done.wait()
            self._stopped.set()

        threading.Thread(target=_wait, name=f"{self.name}-stop", daemon=True).start()
        return self._stopped

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT -> graceful stop. Call from the main thread."""

        def handler(signum, _frame) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (signals are handled meanwhile). True once stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._stopped.wait(0.2)
        return True


class AioGrpcServer:
    """The asyncio flavour of GrpcServer, for services with one long-lived stream per request
    (DetokenizeStream, Generate): a stream costs a coroutine, not a handler thread. Create and use
    it inside the event loop::

        srv = AioGrpcServer("tokenizer", [name], host, port)
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, srv.server)
        await srv.start(); await srv.set_serving(True)
        srv.install_signal_handlers(); await srv.wait()
    """

    def __init__(self, name: str, service_names: Iterable[str], host: str = DEFAULT_HOST, port: int = 0, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, grace_s: float = DEFAULT_GRACE_S,
                 security: InternalSecurity | None = None, reflection: bool = False) -> None:
        self.name = name
        self.service_names = list(service_names)
        self.host = host
        self.grace_s = grace_s
        security = security or InternalSecurity.from_env()
        self.server = grpc.aio.server(options=server_options(max_message_bytes),
                                      interceptors=security.server_interceptors(aio=True))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflection:
            _enable_reflection(self.service_names, self.server)
        self.port = security.add_port(self.server, _bind_address(host, port))
        if self.port == 0:
            raise OSError(f"{name}: could not bind {_bind_address(host, port)}")
        self._on_shutdown: list[Callable[[], object]] = []
        self._stop_task = None

    @property
    def address(self) -> str:
        return _bind_address(self.host, self.port)

    @property
    def stopping(self) -> bool:
        return self._stop_task is not None

    def on_shutdown(self, fn: Callable[[], object]) -> None:
        """Run `fn` (sync, or returning an awaitable) when shutdown starts, before the grace period."""
        self._on_shutdown.append(fn)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", *self.service_names):
            await self.health.set(svc, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()
        logger.info("%s listening on %s", self.name, self.address)
        print(f"{self.name} listening on {self.address}", flush=True)

    async def _stop(self, grace: float) -> None:
        import inspect

        logger.info("%s shutting down (grace %.1fs)", self.name, grace)
        await self.health.enter_graceful_shutdown()
        for fn in self._on_shutdown:
            try:
                r = fn()
                if inspect.isawaitable(r):
                    await r
            except Exception:
                logger.exception("shutdown hook failed")
        await self.server.stop(grace)

    def stop(self, grace: float | None = None):
        """Begin a graceful stop (idempotent); returns the task that completes once stopped."""
        import asyncio

        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(self.grace_s if grace is None else grace))
        return self._stop_task

    def install_signal_handlers(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (logger.info("received %s", s.name), self.stop()))

    async def wait(self) -> None:
        await self.server.wait_for_termination()
        if self._stop_task is not None:
            await self._stop_task
