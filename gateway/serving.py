"""What completions and chat completions share: body parsing (400 naming the field), the model
check (404), starting the generations (errors before any header -> real HTTP statuses), waiting for
a full answer while watching for a disconnect, the SSE loop with its in-band error chunk, usage."""
from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from gateway.backend import Backend, ModelFacts
from gateway.config import GatewayConfig
from gateway.errors import (
    APIError,
    bad_request,
    model_not_found,
    validation_error_to_api,
)
from gateway.generation import PromptGeneration, start_all
from gateway.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from gateway.streaming import (
    DONE,
    ClientDisconnected,
    event_stream,
    run_until_disconnect,
    sse_error,
)
from services import tracing

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Status answered when the client left before the answer (nginx's convention; nobody reads it).
CLIENT_CLOSED_REQUEST = 499


def random_id(prefix: str) -> str:
    """`<prefix>-<the HTTP request's id>` (gateway/telemetry.py), so the completion id, the
    scheduler's request id and every log line of the request share it; a fresh one outside a request."""
    return f"{prefix}-{tracing.REQUEST_ID.get() or uuid.uuid4().hex}"


class BaseServing:
    def __init__(self, backend: Backend, config: GatewayConfig) -> None:
        self.backend = backend
        self.config = config

    # ------------------------------------------------------------------ request checks
    @staticmethod
    def parse(model_cls: type[M], body: bytes) -> M:
        if not body.strip():
            raise bad_request("The request body is empty: send a JSON object.", code="invalid_json")
        try:
            return model_cls.model_validate_json(body)
        except ValidationError as e:
            raise validation_error_to_api(e) from None

    async def check_model(self, req: SamplingFields) -> ModelFacts:
        facts = await self.backend.facts()
        if req.model is not None and req.model not in self.backend.served_names(facts):
            raise model_not_found(req.model)
        return facts

    @staticmethod
    def check_stream_options(req: SamplingFields) -> None:
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")

    # ------------------------------------------------------------------ running
    async def start(self, gens: Sequence[PromptGeneration]) -> None:
        await start_all(gens)

    async def run(self, request: Request, work) -> Response | object:
        """Await `work` (a coroutine) unless the client leaves first (-> a 499 nobody reads)."""
        try:
            return await run_until_disconnect(request, work)
        except ClientDisconnected:
            logger.info("client disconnected before the answer was ready")
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    @staticmethod
    def usage(gens: Sequence[PromptGeneration]) -> UsageInfo:
        prompt = sum(g.prompt_tokens for g in gens)
        completion = sum(g.completion_tokens for g in gens)
        cached = sum(g.cached_tokens for g in gens)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    @staticmethod
    def json(model: BaseModel) -> Response:
        return Response(model.model_dump_json(), media_type="application/json")

    def stream(self, gens: Sequence[PromptGeneration], chunks: Callable[[], AsyncIterator[bytes]]) -> Response:
        """SSE response over `chunks()`; errors become an in-band error chunk; [DONE] at the end.
        Closing (client gone: Starlette cancels us) cancels every gRPC call still open."""

        async def body() -> AsyncIterator[bytes]:
            try:
                try:
                    async for chunk in chunks():
                        yield chunk
                except APIError as e:
                    logger.info("in-band stream error: %s", e.message)
                    yield sse_error(e)
                except Exception as e:
                    logger.exception("stream failed")
                    yield sse_error(APIError(500, f"Internal server error ({type(e).__name__}).",
                                             code="internal_error"))
                yield DONE
            finally:
                close()

        def close() -> None:
            for g in gens:
                g.close()

        return event_stream(body(), close)

    @staticmethod
    def error_json(err: APIError) -> JSONResponse:
        return err.response()
