"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection):
API-key check (401) and the request body size limit (413), both answered in OpenAI's error shape
before any handler runs.

With an API key, /v1/* and the dashboard (/dashboard*: it shows request ids) need it, and /metrics
too with `metrics_auth`. The key comes as `Authorization: Bearer KEY`, or for the dashboard as HTTP
Basic auth with the key as the password (a browser asks for it, and its EventSource then sends it)."""
from __future__ import annotations

import base64
import binascii
import hmac

from gateway.errors import APIError, body_too_large, unauthorized

_BODY_METHODS = (b"POST", b"PUT", b"PATCH")


def route_path(scope) -> str:
    """The request path without the ASGI root_path prefix (--root-path deployments)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path


class GatewayMiddleware:
    def __init__(self, app, api_key: str | None = None, max_body_bytes: int | None = None,
                 metrics_auth: bool = False) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics_auth = metrics_auth

    def _protected(self, path: str) -> bool:
        return (path.startswith(("/v1/", "/dashboard/")) or path == "/dashboard"
                or (self.metrics_auth and path == "/metrics"))

    def _authorized(self, auth: bytes) -> bool:
        scheme, _, token = auth.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"basic":
            try:
                token = base64.b64decode(token.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        headers = dict(scope.get("headers") or ())
        if (self.api_key is not None and self._protected(path) and scope.get("method") != "OPTIONS"
                and not self._authorized(headers.get(b"authorization", b""))):
            await self._reject(unauthorized(), scope, receive, send, basic=path.startswith("/dashboard"))
            return
        if self.max_body_bytes is not None and scope.get("method", "").encode() in _BODY_METHODS:
            limit = self.max_body_bytes
            declared = headers.get(b"content-length")
            if declared is not None:
                try:
                    size = int(declared)
                except ValueError:
                    size = None
                if size is not None and size > limit:
                    await self._reject(body_too_large(limit, size), scope, receive, send)
                    return
            # Chunked (or lying) uploads: buffer up to the limit, then replay to the app.
            messages, total = [], 0
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                total += len(message.get("body", b""))
                if total > limit:
                    await self._reject(body_too_large(limit), scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
            replay = iter(messages)

            async def replay_receive():
                for message in replay:
                    return message
                return await receive()

            await self.app(scope, replay_receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _reject(err: APIError, scope, receive, send, basic: bool = False) -> None:
        challenge = 'Basic realm="pagedserve", charset="UTF-8"' if basic else "Bearer"
        headers = {"WWW-Authenticate": challenge} if err.status == 401 else {}
        headers.update(err.headers)
        err.headers = headers
        await err.response()(scope, receive, send)
