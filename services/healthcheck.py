"""`pagedserve health`: one health probe, for container healthchecks (docker compose `healthcheck`,
Kubernetes exec probes) and scripts.

    pagedserve health --grpc 127.0.0.1:50053 --service pagedserve.v1.Executor   # grpc.health.v1 Check
    pagedserve health --http http://127.0.0.1:8000/health                       # GET, 2xx is healthy

Exit status: 0 healthy (SERVING / HTTP 2xx), 1 not healthy (NOT_SERVING, unknown service, an HTTP
error status, unreachable, timed out), 2 bad usage. One line on stdout says what was seen.

`--live` is the liveness variant: any answer to the health RPC counts (SERVING or NOT_SERVING),
so a scheduler that is waiting for its executor is "alive" but not "ready". `--wait S` retries
until healthy or S seconds have passed (an init step, `make`-style scripts).

Import-light on purpose (grpc and httpx only, loaded lazily): a container healthcheck runs it
every few seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import urlsplit, urlunsplit

DEFAULT_TIMEOUT_S = 3.0


def check_grpc(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_S,
               live: bool = False) -> tuple[bool, str]:
    """(healthy, what was seen) for one grpc.health.v1 Check on `address` (host:port)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.internal_auth import InternalSecurity

    with InternalSecurity.from_env().channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            code = e.code()
            return False, f"{code.name if code else 'ERROR'}: {e.details() or ''}".rstrip(": ")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    if live:  # it answered: the server and its event loop are alive
        ok = resp.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    return ok, status


def normalize_url(url: str) -> str:
    """http://host:port -> http://host:port/health (a URL with a path is used as it is)."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/health")
    return urlunsplit(parts)


def check_http(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, what was seen) for GET `url`: any 2xx is healthy."""
    import httpx

    url = normalize_url(url)
    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"
    return 200 <= r.status_code < 300, f"HTTP {r.status_code}"


def _cmd_health(args: argparse.Namespace) -> int:
    if bool(args.grpc) == bool(args.http):
        print("pagedserve health: give exactly one of --grpc HOST:PORT or --http URL", file=sys.stderr)
        return 2
    if args.http and (args.service or args.live):
        print("pagedserve health: --service and --live apply to --grpc only", file=sys.stderr)
        return 2
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        if args.grpc:
            ok, seen = check_grpc(args.grpc, args.service, args.timeout, live=args.live)
            target = f"{args.grpc} {args.service or '(overall)'}"
        else:
            ok, seen = check_http(args.http, args.timeout)
            target = normalize_url(args.http)
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
    if not args.quiet:
        print(f"{target}: {seen}", flush=True)
    return 0 if ok else 1


def add_health_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "health", help="check a service's health (gRPC health checking or HTTP); exit 0 if healthy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc", metavar="HOST:PORT", default=None,
                   help="grpc.health.v1 Check on this address; healthy when SERVING")
    p.add_argument("--service", default="",
                   help="with --grpc: the service name to check (e.g. pagedserve.v1.Scheduler); default: the "
                        "server's overall status")
    p.add_argument("--live", action="store_true",
                   help="with --grpc: healthy when the server answers at all (SERVING or NOT_SERVING): liveness")
    p.add_argument("--http", metavar="URL", default=None,
                   help="GET this URL (http://host:port means http://host:port/health); healthy on 2xx")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds for one check (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--wait", type=float, default=0.0,
                   help="retry until healthy or this many seconds have passed (default 0: one check)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between retries with --wait (default 1)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing, only the exit status")
    p.set_defaults(func=_cmd_health)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve")
    add_health_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["health", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
