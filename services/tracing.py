"""OpenTelemetry tracing and request-scoped logging shared by the gateway and every gRPC service
(docs/observability.md).

Turning it on follows the standard `OTEL_*` environment variables, read by `setup_tracing`:

- nothing set: no tracer provider is installed; spans are no-ops and nothing is propagated
  (`enabled()` is False, so the hot paths skip even the no-op calls);
- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): OTLP export, gRPC by
  default, `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` when that exporter package is installed;
  batched (`BatchSpanProcessor`, its `OTEL_BSP_*` settings apply);
- `OTEL_TRACES_EXPORTER`: `otlp` (the default once an endpoint is set), `console`, `none`;
- `OTEL_SDK_DISABLED=true` wins over everything;
- `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`: the resource (default `pagedserve-<service>`);
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`: the SDK's sampler (default: parent-based,
  always on);
- test mode, `PAGEDSERVE_TRACE_TEST_DIR=<dir>`: every finished span is appended at once as one
  JSON line to `<dir>/<service>-<pid>.jsonl` (what tests/integration/test_observability.py reads).

Propagation is W3C trace context (`traceparent`, `tracestate`) through opentelemetry's global
propagator: `grpc_metadata()` injects the current (or given) context into outgoing gRPC metadata,
`context_from_metadata()` extracts it on the server side. The request id travels beside it as
`x-request-id` metadata and lives in the `REQUEST_ID` context variable, which `RequestLogFilter`
adds to every log record (text: ` [req=<id>]`; JSON: `request_id`, plus `trace_id`/`span_id` of
the current span when one is recording).

A long-lived stream cannot carry per-request metadata (the scheduler's single Step stream to the
executor), so there the context travels in the message: `carrier()` gives a dict for
NewRequestData.trace_context, and `context_from_carrier()` reads it back.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

logger = logging.getLogger(__name__)

TEST_DIR_ENV = "PAGEDSERVE_TRACE_TEST_DIR"
REQUEST_ID_METADATA_KEY = "x-request-id"
TRACER_NAME = "pagedserve"

# The request a log line / span belongs to (set per HTTP request in the gateway, per RPC in the
# services; asyncio tasks and threads started from there inherit it).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pagedserve_request_id", default=None)

_enabled = False
_service = ""
_lock = threading.Lock()


def enabled() -> bool:
    """True once `setup_tracing` installed a recording tracer provider in this process."""
    return _enabled


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def service_name() -> str:
    return _service


# ---------------------------------------------------------------------------- setup
class JsonLinesSpanExporter:
    """Test-mode exporter: each finished span as one JSON line (flushed at once) in a file of its
    own per process, so a test can put the spans of several processes together."""

    def __init__(self, path: str, service: str) -> None:
        self.path = path
        self.service = service
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the process

    def export(self, spans: Sequence[Any]):
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx = s.get_span_context()
            parent = s.parent
            lines.append(json.dumps({
                "name": s.name,
                "service": self.service,
                "resource_service": s.resource.attributes.get("service.name"),
                "pid": os.getpid(),
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
                "kind": s.kind.name,
                "start_ns": s.start_time,
                "end_ns": s.end_time,
                "status": s.status.status_code.name,
                "attributes": {k: (v if isinstance(v, (str, int, float, bool)) else list(v))
                               for k, v in (s.attributes or {}).items()},
            }))
        with self._lock:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _otlp_exporter():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def setup_tracing(service: str) -> bool:
    """Install a tracer provider for this process as the OTEL_* variables say (module docstring).
    Idempotent; returns whether tracing is on. Never raises: a missing exporter package is logged."""
    global _enabled, _service
    with _lock:
        if _enabled:
            return True
        _service = service
        env = os.environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        test_dir = env.get(TEST_DIR_ENV)
        names = [x.strip().lower() for x in env.get("OTEL_TRACES_EXPORTER", "").split(",") if x.strip()]
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not names:
            names = ["otlp"] if endpoint else []
        names = [n for n in names if n != "none"]
        if not names and not test_dir:
            return False
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import (
                BatchSpanProcessor,
                ConsoleSpanExporter,
                SimpleSpanProcessor,
            )
        except ImportError as e:  # pragma: no cover - opentelemetry-sdk is in the serve extra
            logger.warning("tracing requested but opentelemetry-sdk is not installed: %s", e)
            return False
        attrs = {"service.name": f"pagedserve-{service}"} if not env.get("OTEL_SERVICE_NAME") else {}
        provider = TracerProvider(resource=Resource.create(attrs))
        installed = []
        for name in names:
            try:
                if name == "otlp":
                    provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
                elif name == "console":
                    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
                else:
                    logger.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", name)
                    continue
                installed.append(name)
            except Exception as e:  # noqa: BLE001 - tracing must never stop a service
                logger.warning("could not set up the %s span exporter: %s: %s", name, type(e).__name__, e)
        if test_dir:
            os.makedirs(test_dir, exist_ok=True)
            path = os.path.join(test_dir, f"{service}-{os.getpid()}.jsonl")
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path, service)))
            installed.append(f"test file {path}")
        if not installed:
            return False
        trace.set_tracer_provider(provider)
        _enabled = True
        logger.info("tracing on: %s", ", ".join(installed))
        return True


def shutdown_tracing() -> None:
    """Flush and stop the exporters (the SDK also does this at interpreter exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:
            logger.debug("tracer provider shutdown failed", exc_info=True)


# ---------------------------------------------------------------------------- propagation
def carrier(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace context of `ctx` (default: the current one) as a dict; empty when there is none."""
    out: dict[str, str] = {}
    propagate.inject(out, context=ctx)
    return out


def context_from_carrier(data: Mapping[str, str] | None) -> otel_context.Context | None:
    if not data:
        return None
    return propagate.extract(dict(data))


def grpc_metadata(ctx: otel_context.Context | None = None,
                  request_id: str | None = None) -> list[tuple[str, str]] | None:
    """Outgoing gRPC metadata: traceparent/tracestate of `ctx` (default: current) when tracing is
    on, and x-request-id (default: REQUEST_ID). None when there is nothing to send."""
    md: list[tuple[str, str]] = []
    if _enabled:
        md.extend(carrier(ctx).items())
    rid = request_id if request_id is not None else REQUEST_ID.get()
    if rid:
        md.append((REQUEST_ID_METADATA_KEY, rid))
    return md or None


def _metadata_dict(metadata: Iterable | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def context_from_metadata(metadata: Iterable | None) -> tuple[otel_context.Context | None, str | None]:
    """(trace context, request id) from incoming gRPC invocation metadata."""
    md = _metadata_dict(metadata)
    rid = md.get(REQUEST_ID_METADATA_KEY)
    if not _enabled or "traceparent" not in md:
        return None, rid
    return propagate.extract(md), rid


def span_is_sampled(span: trace.Span | None) -> bool:
    if span is None:
        return False
    ctx = span.get_span_context()
    return ctx.is_valid and ctx.trace_flags.sampled


# ---------------------------------------------------------------------------- spans with past times
# Spans built after the fact (queue / prefill / decode from the scheduler's timestamps, the
# executor's per-request aggregates) take their times from time.monotonic(); OpenTelemetry wants
# epoch nanoseconds.
def mono_to_ns(t_monotonic: float) -> int:
    return time.time_ns() - int((time.monotonic() - t_monotonic) * 1e9)


def record_span(name: str, parent: otel_context.Context | None, start_ns: int, end_ns: int,
                attributes: Mapping[str, Any] | None = None,
                kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> trace.Span:
    span = tracer().start_span(name, context=parent, kind=kind, start_time=start_ns,
                               attributes=dict(attributes or {}))
    span.end(end_time=max(end_ns, start_ns))
    return span


# ---------------------------------------------------------------------------- server spans
class server_span:
    """A SERVER span for one RPC, child of the caller's context from the invocation metadata, with
    REQUEST_ID set for the RPC's log lines. A no-op (but the request id) when tracing is off.
    Works for async handlers (`async with` or `with`) and async generators (no attach/detach across
    yields: `.span` is started with an explicit parent and ended by `end()`/`__exit__`)."""

    __slots__ = ("_rid_token", "context", "name", "request_id", "span")

    def __init__(self, grpc_context, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        try:
            md = grpc_context.invocation_metadata() if grpc_context is not None else None
        except Exception:  # noqa: BLE001
            md = None
        parent, rid = context_from_metadata(md)
        self.name = name
        self.request_id = rid
        self._rid_token = REQUEST_ID.set(rid) if rid else None
        self.span: trace.Span | None = None
        self.context: otel_context.Context | None = None
        if _enabled:
            attrs = dict(attributes or {})
            attrs["rpc.system"] = "grpc"
            if rid:
                attrs.setdefault("pagedserve.request_id", rid)
            self.span = tracer().start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attrs)
            self.context = trace.set_span_in_context(self.span)

    def set_error(self, e: BaseException) -> None:
        if self.span is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"[:200]))

    def end(self) -> None:
        if self.span is not None:
            self.span.end()
            self.span = None
        if self._rid_token is not None:
            try:
                REQUEST_ID.reset(self._rid_token)
            except ValueError:  # reset from another context (generator finalised elsewhere)
                pass
            self._rid_token = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.set_error(exc)
        self.end()


# ---------------------------------------------------------------------------- logging
class RequestLogFilter(logging.Filter):
    """Adds the request id (and trace ids) to every record: `_req` for the text format
    (' [req=<id>]' or ''), `request_id` / `trace_id` / `span_id` attributes for JSON logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            record.request_id = rid
            record._req = f" [req={rid}]"
        else:
            record._req = ""
        if _enabled:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id = format(ctx.trace_id, "032x")
                record.span_id = format(ctx.span_id, "016x")
        return True


def traced_rpc(name: str):
    """Decorator for grpc.aio servicer methods (coroutines or async generators): each call runs in
    a `server_span` named `name`."""
    import functools
    import inspect

    def deco(fn):
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(self, request, context):
                span = server_span(context, name)
                agen = fn(self, request, context)
                try:
                    async for item in agen:
                        yield item
                except BaseException as e:
                    if not isinstance(e, GeneratorExit) and type(e).__name__ != "CancelledError":
                        span.set_error(e)
                    raise
                finally:
                    await agen.aclose()
                    span.end()

            return stream

        @functools.wraps(fn)
        async def unary(self, request, context):
            with server_span(context, name):
                return await fn(self, request, context)

        return unary

    return deco
