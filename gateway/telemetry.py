"""Per-HTTP-request observability, as a pure ASGI middleware (outermost, so 401 / 413 count too):

- a request id (`x-request-id` response header; services.tracing.REQUEST_ID for every log line of
  the request and for the completion id `cmpl-<id>` / `chatcmpl-<id>`; sent to the services as
  `x-request-id` gRPC metadata);
- `pagedserve:http_requests_total{endpoint,method,status}`, the duration histogram and the
  in-flight gauge;
- with tracing on, the request's root SERVER span `POST /v1/...` (continuing a caller's W3C
  `traceparent` header when there is one); the serving code opens its children (tokenize,
  generate, detokenize) under it.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
import uuid

from opentelemetry import propagate, trace

from gateway.metrics import GatewayMetrics, endpoint_label, method_label
from gateway.middleware import route_path
from services import tracing

# perf_counter() at the HTTP request's arrival (TTFT and e2e are measured from it).
REQUEST_START: contextvars.ContextVar[float | None] = contextvars.ContextVar("pagedserve_request_start",
                                                                            default=None)


def span(name: str, **attributes):
    """A child span of the current context (no-op context manager while tracing is off)."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    return tracing.tracer().start_as_current_span(name, attributes=attributes or None)


class TelemetryMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        endpoint = endpoint_label(path)
        method = method_label(scope.get("method", "GET"))
        rid = uuid.uuid4().hex
        rid_token = tracing.REQUEST_ID.set(rid)
        start = time.perf_counter()
        start_token = REQUEST_START.set(start)
        status = 500  # the app raised before answering: Starlette's error middleware sends 500
        counted = False
        metrics = GatewayMetrics.get()
        in_flight = metrics.http_in_flight.labels(endpoint)
        in_flight.inc()
        rid_header = (b"x-request-id", rid.encode())

        completed = left = False

        async def receive_watching() -> dict:
            # A disconnect before the last body byte went out: the client left (counted once).
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect" and not completed and not left:
                left = True
                metrics.client_disconnects.labels(endpoint).inc()
            return message

        async def send_with_id(message) -> None:
            nonlocal status, counted, completed
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
                # counted when the answer starts (a client that has its response sees it counted)
                metrics.http_requests.labels(endpoint, method, str(status)).inc()
                counted = True
            await send(message)

        try:
            if tracing.enabled() and path.startswith("/v1/"):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
                parent = propagate.extract(headers) if "traceparent" in headers else None
                with tracing.tracer().start_as_current_span(
                        f"{method} {endpoint}", context=parent, kind=trace.SpanKind.SERVER,
                        attributes={"http.request.method": method, "url.path": path, "http.route": endpoint,
                                    "pagedserve.request_id": rid}) as root_span:
                    try:
                        await self.app(scope, receive_watching, send_with_id)
                    finally:
                        root_span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            root_span.set_status(trace.Status(trace.StatusCode.ERROR))
            else:
                await self.app(scope, receive_watching, send_with_id)
        finally:
            in_flight.dec()
            if not counted:
                metrics.http_requests.labels(endpoint, method, str(status)).inc()
            metrics.http_duration.labels(endpoint).observe(time.perf_counter() - start)
            REQUEST_START.reset(start_token)
            tracing.REQUEST_ID.reset(rid_token)
