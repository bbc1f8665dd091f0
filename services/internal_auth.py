"""Who may call the internal gRPC services (issue 16, finding 2): a shared service token and/or mTLS.

- **Service token**: every call must carry `authorization: Bearer <token>` metadata; a server
  interceptor answers UNAUTHENTICATED otherwise (compared in constant time). The token comes from
  `$PAGEDSERVE_SERVICE_TOKEN` or the file named by `$PAGEDSERVE_SERVICE_TOKEN_FILE` / `--service-token-file`,
  never from argv (it would show in `ps`). `pagedserve serve` generates one per stack and hands
  it to its children in the environment.
- **mTLS**: `--tls-cert/--tls-key/--tls-ca` (or `$PAGEDSERVE_TLS_CERT/_KEY/_CA`, file paths): servers
  listen with TLS and require a client certificate signed by the CA; clients present the same
  kind of certificate and verify the server against the CA.
- grpc.health.v1 stays open (liveness / readiness probes carry no credentials and learn nothing
  but SERVING / NOT_SERVING); everything else, reflection included, needs the token.

Neither configured: the services accept any caller, as before (loopback binds by default).
`InternalSecurity.from_env()` is what every server and client uses unless given one explicitly.
"""
from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

TOKEN_ENV = "PAGEDSERVE_SERVICE_TOKEN"
TOKEN_FILE_ENV = "PAGEDSERVE_SERVICE_TOKEN_FILE"
TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV = "PAGEDSERVE_TLS_CERT", "PAGEDSERVE_TLS_KEY", "PAGEDSERVE_TLS_CA"
METADATA_KEY = "authorization"
OPEN_SERVICES = ("grpc.health.v1.Health",)


def read_secret_file(path: str) -> str:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        value = f.read().strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(os.path.expanduser(path), "rb") as f:
        return f.read()


@dataclass(frozen=True)
class InternalSecurity:
    token: str | None = None
    tls_cert: bytes | None = None  # PEM: this process's certificate (server and client side)
    tls_key: bytes | None = None
    tls_ca: bytes | None = None    # PEM: the CA that signs every service's certificate

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, token_file: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None
                 ) -> InternalSecurity:
        env = os.environ if env is None else env
        token = env.get(TOKEN_ENV) or None
        token_file = token_file or env.get(TOKEN_FILE_ENV)
        if token is None and token_file:
            token = read_secret_file(token_file)
        paths = (tls_cert or env.get(TLS_CERT_ENV), tls_key or env.get(TLS_KEY_ENV), tls_ca or env.get(TLS_CA_ENV))
        if any(paths) and not all(paths):
            raise ValueError("mTLS needs all three of --tls-cert, --tls-key and --tls-ca")
        cert, key, ca = (_read(p) for p in paths)
        return cls(token=token, tls_cert=cert, tls_key=key, tls_ca=ca)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> InternalSecurity:
        return cls.from_env(token_file=getattr(args, "service_token_file", None),
                            tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
                            tls_ca=getattr(args, "tls_ca", None))

    # ------------------------------------------------------------------ server side
    def add_port(self, server, address: str) -> int:
        if not self.tls:
            return server.add_insecure_port(address)
        creds = grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca,
                                            require_client_auth=True)
        return server.add_secure_port(address, creds)

    def server_interceptors(self, aio: bool) -> list:
        if self.token is None:
            return []
        return [_AioTokenCheck(self.token) if aio else _TokenCheck(self.token)]

    # ------------------------------------------------------------------ client side
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca, private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def channel(self, target: str, options=None) -> grpc.Channel:
        """A sync channel that authenticates as this process (TLS and / or the token)."""
        options = list(options or ())
        ch = (grpc.secure_channel(target, self._credentials(), options=options) if self.tls
              else grpc.insecure_channel(target, options=options))
        return grpc.intercept_channel(ch, _AddToken(self.metadata())) if self.token else ch

    def aio_channel(self, target: str, options=None) -> grpc.aio.Channel:
        options = list(options or ())
        interceptors = _aio_client_interceptors(self.metadata()) if self.token else None
        if self.tls:
            return grpc.aio.secure_channel(target, self._credentials(), options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def security_from_args_or_log(args: argparse.Namespace, log) -> InternalSecurity | None:
    """A service's settings from its flags and environment; None (after logging why) when they are
    unusable (a missing file, an incomplete TLS triple): the service then exits with code 2."""
    try:
        return InternalSecurity.from_args(args)
    except (OSError, ValueError) as e:
        log.error("bad security settings: %s", e)
        return None


API_KEY_ENV = "PAGEDSERVE_API_KEY"


def resolve_api_key(flag_value: str | None, file_path: str | None, env: Mapping[str, str] | None = None,
                    warn=None) -> str | None:
    """The gateway's API key: --api-key-file, else $PAGEDSERVE_API_KEY, else --api-key (kept working,
    with a warning: a key in argv shows in `ps` to every local user)."""
    if file_path:
        return read_secret_file(file_path)
    from_env = (os.environ if env is None else env).get("PAGEDSERVE_API_KEY")  # = API_KEY_ENV
    if from_env:
        return from_env
    if flag_value and warn is not None:
        warn(f"--api-key shows in `ps` to every local user: prefer ${API_KEY_ENV} or --api-key-file")
    return flag_value or None


def generate_token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def add_security_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("internal security (services/internal_auth.py)")
    g.add_argument("--service-token-file", default=None,
                   help=f"file holding the shared service token (or ${TOKEN_ENV}); never pass the token in argv")
    g.add_argument("--tls-cert", default=None, help=f"PEM certificate for mTLS between services (or ${TLS_CERT_ENV})")
    g.add_argument("--tls-key", default=None, help=f"PEM private key of --tls-cert (or ${TLS_KEY_ENV})")
    g.add_argument("--tls-ca", default=None, help=f"PEM CA that signs every service's certificate (or ${TLS_CA_ENV})")


# ---------------------------------------------------------------------------- interceptors
def _authorized(token: str, metadata) -> bool:
    expected = f"Bearer {token}".encode()
    for key, value in metadata or ():
        if key == METADATA_KEY:
            got = value.encode() if isinstance(value, str) else value
            return hmac.compare_digest(got, expected)
    return False


def _is_open(method: str) -> bool:
    return any(method.startswith(f"/{svc}/") for svc in OPEN_SERVICES)


def _deny(handler: grpc.RpcMethodHandler | None, aio: bool) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    if handler is None:
        return None
    msg = "missing or wrong service token (authorization: Bearer <token>)"
    if aio:
        async def deny_unary(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        async def deny_stream(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
            yield  # pragma: no cover (an async generator)
    else:
        def deny_unary(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        def deny_stream(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
            yield  # pragma: no cover

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(deny_unary, des, ser)


class _TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if _is_open(handler_call_details.method) or _authorized(self.token, handler_call_details.invocation_metadata):
            return handler
        return _deny(handler, aio=False)


class _AioTokenCheck(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if _is_open(handler_call_details.method) or _authorized(self.token, handler_call_details.invocation_metadata):
            return handler
        return _deny(handler, aio=True)


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Sync client side: the token on every call."""

    def __init__(self, metadata) -> None:
        self._md = tuple(metadata)

    def _details(self, d):
        return _ClientCallDetails(d.method, d.timeout, (*(d.metadata or ()), *self._md), d.credentials,
                                  d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def _aio_client_interceptors(metadata) -> list:
    md = tuple(metadata)

    def details(d):
        merged = grpc.aio.Metadata(*(d.metadata or ()), *md)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, merged, d.credentials, d.wait_for_ready)

    class UU(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
            return await continuation(details(client_call_details), request_iterator)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
            return await continuation(details(client_call_details), request_iterator)

    return [UU(), US(), SU(), SS()]
