"""`python -m gateway`: the OpenAI-compatible HTTP gateway in front of the scheduler and tokenizer
services. Prints `gateway listening on HOST:PORT` once it serves (port 0 picks a free port).

`--workers N` (N > 1) runs N uvicorn worker processes on the one bound socket; their Prometheus
metrics are merged through prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR: a
temporary directory unless set, emptied at start; docs/observability.md)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import tempfile

from gateway.config import DEFAULT_MAX_BODY_BYTES, GatewayConfig
from gateway.routing.policies import POLICIES
from services.grpc_server import SCHEDULER_PORT, TOKENIZER_PORT, configure_logging

logger = logging.getLogger("gateway")

DEFAULT_PORT = 8000
DRAIN_BACKSTOP_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--scheduler-address", default=f"127.0.0.1:{SCHEDULER_PORT}",
                   help="scheduler replica(s): HOST:PORT or a comma list a:1,b:2 (requests are routed over them)")
    p.add_argument("--scheduler-dns", default=None, metavar="NAME:PORT",
                   help="discover the scheduler replicas by resolving NAME (e.g. a headless Service), "
                        "re-resolved every --scheduler-dns-interval seconds; overrides --scheduler-address")
    p.add_argument("--scheduler-dns-interval", type=float, default=5.0, help="seconds between DNS lookups (default 5)")
    p.add_argument("--routing", default="prefix", choices=POLICIES,
                   help="how requests are spread over the replicas (default prefix: cache-aware with bounded load)")
    p.add_argument("--routing-prefix-blocks", type=int, default=32,
                   help="leading KV blocks of a prompt the prefix policy hashes (default 32)")
    p.add_argument("--routing-load-factor", type=float, default=1.5,
                   help="prefix policy: a replica above this x the mean load loses its prefixes to least-load "
                        "(default 1.5)")
    p.add_argument("--routing-cache-threshold", type=float, default=0.5,
                   help="prefix policy: share of a prompt's hashed blocks a replica must hold to get it (default 0.5)")
    p.add_argument("--tokenizer-address", default=f"127.0.0.1:{TOKENIZER_PORT}")
    p.add_argument("--model-name", "--served-model-name", dest="model_name", default=None,
                   help="model name clients use (default: the scheduler's GetModelInfo model_name)")
    p.add_argument("--model-alias", action="append", default=[], help="another accepted model name (repeatable)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* and /dashboard (shows in `ps`: prefer "
                        "$PAGEDSERVE_API_KEY or --api-key-file; unset: open)")
    p.add_argument("--api-key-file", default=None, help="file holding the API key")
    p.add_argument("--metrics-auth", action="store_true", help="/metrics needs the API key too")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--max-n", type=int, default=128, help="largest n accepted (default 128)")
    p.add_argument("--root-path", default="", help="ASGI root_path when served behind a path-prefixing proxy")
    p.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (default 1; >1: multiprocess Prometheus metrics)")
    p.add_argument("--dashboard-interval", type=float, default=0.5,
                   help="seconds between the live dashboard's snapshots (default 0.5)")
    from services.internal_auth import add_security_args

    add_security_args(p)
    g = p.add_argument_group("admission (one request may not starve the others: gateway/admission.py)")
    g.add_argument("--max-prompts", type=int, default=256, help="prompts per completions request (default 256)")
    g.add_argument("--max-request-prompt-tokens", type=int, default=1 << 20,
                   help="prompt tokens of one request in all (default 1048576)")
    g.add_argument("--tokenize-concurrency", type=int, default=4,
                   help="tokenizer calls one request may have in flight (default 4)")
    return p


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    from gateway.routing.discovery import parse_addresses, split_dns_target
    from services.internal_auth import resolve_api_key

    try:
        if args.scheduler_dns:
            split_dns_target(args.scheduler_dns)
        else:
            parse_addresses(args.scheduler_address)
    except ValueError as e:
        raise SystemExit(f"gateway: {e}") from None
    api_key = resolve_api_key(args.api_key, args.api_key_file, warn=logger.warning)
    return GatewayConfig(scheduler_address=args.scheduler_address, tokenizer_address=args.tokenizer_address,
                         scheduler_dns=args.scheduler_dns, scheduler_dns_interval_s=args.scheduler_dns_interval,
                         routing=args.routing, routing_prefix_blocks=args.routing_prefix_blocks,
                         routing_load_factor=args.routing_load_factor,
                         routing_cache_threshold=args.routing_cache_threshold,
                         model_name=args.model_name, model_aliases=tuple(args.model_alias), api_key=api_key,
                         metrics_auth=args.metrics_auth, shutdown_grace_s=args.shutdown_grace,
                         max_body_bytes=args.max_body_bytes, max_n=args.max_n, root_path=args.root_path,
                         dashboard_interval_s=args.dashboard_interval, max_prompts=args.max_prompts,
                         max_request_prompt_tokens=args.max_request_prompt_tokens,
                         tokenize_concurrency=args.tokenize_concurrency, service_token_file=args.service_token_file,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)


CONFIG_ENV = "PAGEDSERVE_GATEWAY_CONFIG"
LOGGING_ENV = "PAGEDSERVE_GATEWAY_LOGGING"


def create_app_from_env():
    """uvicorn factory for the worker processes of `--workers N` (the parent passes the settings in
    the environment: workers are spawned, not forked)."""
    from gateway.app import create_app

    level, fmt = os.environ.get(LOGGING_ENV, "info:text").split(":", 1)
    configure_logging(level, fmt, "gateway")
    raw = json.loads(os.environ[CONFIG_ENV])
    raw["model_aliases"] = tuple(raw.get("model_aliases") or ())
    return create_app(GatewayConfig(**raw))


def prepare_multiprocess_metrics() -> tuple[str, bool]:
    """PROMETHEUS_MULTIPROC_DIR for the workers: the given directory emptied of old files (stale
    counters would be merged in), or a new temporary one (removed at exit). (dir, created)."""
    from gateway.metrics import MULTIPROC_ENV

    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
        return path, False
    path = tempfile.mkdtemp(prefix="pagedserve-prometheus-")
    os.environ[MULTIPROC_ENV] = path
    return path, True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from gateway.app import create_app

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, "gateway")
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        logger.error("could not bind %s:%d: %s", args.host, args.port, e)
        return 1
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if args.workers > 1:
        return run_workers(args, sock, address)

    try:
        app = create_app(config_from_args(args))
    except (OSError, ValueError) as e:
        logger.error("bad arguments: %s", e)
        return 2

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(f"gateway listening on {address}", flush=True)

    # SIGTERM drains first (the app hooks the signal: gateway/drain.py), so in-flight requests have
    # had their --shutdown-grace when uvicorn stops: its own wait is only a backstop.
    config = uvicorn.Config(app, log_config=None, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=DRAIN_BACKSTOP_S, backlog=4096)
    Server(config).run(sockets=[sock])
    return 0


def run_workers(args: argparse.Namespace, sock: socket.socket, address: str) -> int:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    try:
        config = config_from_args(args)
    except (OSError, ValueError) as e:
        logger.error("bad arguments: %s", e)
        return 2
    metrics_dir, created = prepare_multiprocess_metrics()
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    os.environ[LOGGING_ENV] = f"{args.log_level}:{args.log_format}"
    uv_config = uvicorn.Config("gateway.__main__:create_app_from_env", factory=True, workers=args.workers,
                               log_config=None, log_level=args.log_level, access_log=args.access_log,
                               timeout_graceful_shutdown=DRAIN_BACKSTOP_S, backlog=4096)
    logger.info("gateway: %d workers, metrics merged in %s", args.workers, metrics_dir)
    # The socket is bound and listening: connections wait in its backlog until a worker accepts.
    sock.listen(4096)
    print(f"gateway listening on {address}", flush=True)
    try:
        Multiprocess(uv_config, sockets=[sock]).run()
    finally:
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
