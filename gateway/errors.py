"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure the gateway reports goes through `APIError`: request validation (400, naming the
field, never echoing the input back), auth (401), unknown model / route (404), method (405), body
size (413), a full scheduler queue (429 + Retry-After), a backend down (503), a request past its
own `timeout` (504, code request_timeout: docs/scheduling.md). A client's mistake is
never a 500: 500 only means a bug or an engine failure the scheduler could not recover from.
`install_exception_handlers` maps FastAPI / Starlette's own exceptions onto the same shape, so even
a 404 for an unknown route or a 405 looks like OpenAI's.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# Longest message we ever send back (a validation message must not carry a huge input back).
MAX_MESSAGE_CHARS = 1000

_DEFAULT_TYPE = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # what OpenAI answers for a bad key (code "invalid_api_key")
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


def _truncate(s: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return s if len(s) <= limit else s[: limit - 15] + "... (truncated)"


class APIError(Exception):
    """An error answered as `status` with OpenAI's error body (and optional extra headers)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = _truncate(message)
        self.type = type or _DEFAULT_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


# ---------------------------------------------------------------------------- constructors
def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def request_timed_out(detail: str) -> APIError:
    """The request's own timeout (its `timeout`, or the scheduler's --request-timeout) passed before
    it finished: the scheduler aborted it. 504 like any deadline; `x-should-retry: false` keeps
    OpenAI SDKs from retrying (they retry 408 and 5xx), as a retry would only time out again."""
    detail = detail or "request timed out"
    return APIError(504, f"{detail[:1].upper()}{detail[1:].rstrip('.')}.", code="request_timeout",
                    headers={"x-should-retry": "false"})


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= 200 else model[:200] + "..."
    return APIError(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect API key provided. Pass it as `Authorization: Bearer <key>`.",
                    code="invalid_api_key")


def body_too_large(limit: int, size: int | None = None) -> APIError:
    got = f" (got {size} bytes)" if size is not None else ""
    return APIError(413, f"Request body too large: the limit is {limit} bytes{got}.", code="request_too_large")


def context_length_exceeded(max_model_len: int, prompt_tokens: int, max_tokens: int | None,
                            what: str = "prompt") -> APIError:
    if max_tokens is None or prompt_tokens >= max_model_len:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your {what} has "
               f"{prompt_tokens} tokens, which leaves no room for a completion. Please reduce the length "
               f"of the {what}.")
    else:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
               f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
               f"completion). Please reduce the length of the {what} or completion.")
    return APIError(400, msg, param="max_tokens" if max_tokens is not None and prompt_tokens < max_model_len
                    else ("messages" if what == "messages" else "prompt"), code="context_length_exceeded")


def validation_error_to_api(exc: ValidationError | RequestValidationError, prefix_skip: int = 0) -> APIError:
    """The first pydantic error as a 400 naming the field (`messages.0.content`), without the input."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ())][prefix_skip:]
    # FastAPI prefixes "body"; pydantic puts union branch names (str, list[int], ...) into loc.
    loc = [x for x in loc if x != "body" and not _looks_like_type_tag(x)]
    field = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return bad_request(f"Invalid JSON body: {err.get('msg', 'could not parse')}.", code="invalid_json")
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter")
    msg = str(err.get("msg", "invalid value"))
    extra = f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for '{field}': {msg}.{extra}" if field else f"{msg}.{extra}", param=field,
                       code="invalid_value")


def _looks_like_type_tag(x: str) -> bool:
    return any(ch in x for ch in "[]()") or x in ("str", "int", "float", "bool", "function-after", "constrained-str")


# ---------------------------------------------------------------------------- handlers
def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("answering %d: %s", exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_api(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed for {request.url.path}.",
                           code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        headers = dict(exc.headers or {})
        headers.update(err.headers)
        err.headers = headers
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, f"Internal server error ({type(exc).__name__}).", code="internal_error").response()
