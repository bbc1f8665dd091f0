"""`create_app(config)`: the OpenAI-compatible FastAPI application.

    GET  /v1/models              the served model (name from --model-name or the scheduler)
    GET  /v1/models/{model}
    POST /v1/completions
    POST /v1/chat/completions
    GET  /health                 200 only when both backends are SERVING and the executor answers (503 while draining)
    GET  /version
    GET  /metrics                Prometheus metrics (gateway/metrics.py; every worker's with --workers > 1)
    GET  /dashboard              live dashboard (gateway/dashboard.py), fed by GET /dashboard/stream (SSE)

The gRPC channels are opened in the lifespan (inside the server's event loop) and shared by all
requests; `app.state.backend` is the `Backend`. `app.state.begin_drain(on_done)` starts the
graceful drain (gateway/drain.py; the server calls it on SIGTERM).
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway import dashboard as dashboard_mod
from gateway import metrics as metrics_mod
from gateway.backend import Backend
from gateway.config import GatewayConfig
from gateway.drain import Drain, DrainMiddleware, install_signal_drain
from gateway.errors import install_exception_handlers, model_not_found
from gateway.middleware import GatewayMiddleware
from gateway.openapi import install_openapi
from gateway.protocol import ModelCard, ModelList
from gateway.serving_chat import ChatServing
from gateway.serving_completions import CompletionsServing
from gateway.telemetry import TelemetryMiddleware
from services import tracing

logger = logging.getLogger(__name__)


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("pagedserve")
    except Exception:  # noqa: BLE001 (not installed: running from a checkout)
        return "0.1.0"


def _no_native_telemetry() -> dict:
    """FastAPI >= 0.16x instruments itself with the global OpenTelemetry providers (a second root
    span per request, spans for /health polls, its own HTTP metrics). gateway/telemetry.py owns the
    request's span, metrics and id, so turn that off where the option exists."""
    import inspect

    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    config = config or GatewayConfig()
    tracing.setup_tracing("gateway")  # as the OTEL_* variables say; off by default
    metrics_mod.GatewayMetrics.get()
    backend = Backend(config)
    completions = CompletionsServing(backend, config)
    chat = ChatServing(backend, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await backend.start()
        install_signal_drain(drain, begin_drain)  # SIGTERM drains (gateway/drain.py)
        logger.info("gateway: scheduler at %s, tokenizer at %s", config.scheduler_address, config.tokenizer_address)
        try:
            yield
        finally:
            await hub.close()
            await backend.close()

    app = FastAPI(title="pagedserve", version=version(), lifespan=lifespan, root_path=config.root_path,
                  **_no_native_telemetry())
    app.state.backend = backend
    app.state.config = config
    drain = Drain(config.shutdown_grace_s, config.retry_after_s)
    app.state.drain = drain

    def begin_drain(on_done) -> None:
        replicas = backend.replicas
        drain.start(replicas.fail_all if replicas is not None else (lambda _err: 0), on_done)

    app.state.begin_drain = begin_drain
    install_exception_handlers(app)
    install_openapi(app)
    app.add_middleware(DrainMiddleware, drain=drain)  # inside the auth check: a 401 stays a 401
    app.add_middleware(GatewayMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       metrics_auth=config.metrics_auth)
    app.add_middleware(TelemetryMiddleware)  # outermost: request id, HTTP metrics, the request's span
    hub = dashboard_mod.install(app, backend, config.dashboard_interval_s)

    def card(facts) -> ModelCard:
        return ModelCard(id=facts.name, created=facts.created, root=facts.name, max_model_len=facts.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> Response:
        facts = await backend.facts()
        cards = [card(facts)] + [ModelCard(id=a, created=facts.created, root=facts.name,
                                           max_model_len=facts.max_model_len) for a in config.model_aliases]
        return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        facts = await backend.facts()
        if model not in backend.served_names(facts):
            raise model_not_found(model)
        c = card(facts)
        c.id = model
        return Response(c.model_dump_json(), media_type="application/json")

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create(request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if drain.draining:
            return JSONResponse({"status": "draining", "checks": {}}, status_code=503,
                                headers={"Retry-After": str(config.retry_after_s)})
        ok, checks = await backend.health()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "checks": checks}, status_code=200 if ok else 503)

    @app.get("/version")
    async def get_version() -> JSONResponse:
        return JSONResponse({"version": version()})

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> Response:
        body, content_type = metrics_mod.render()
        return Response(body, media_type=content_type)

    return app
