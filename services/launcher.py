"""`pagedserve serve [MODEL]`: the whole stack as supervised child processes.

    executor   python -m services.executor  MODEL --port P_E  (engine flags)
    tokenizer  python -m services.tokenizer MODEL --port P_T
    scheduler  python -m services.scheduler --executor-address 127.0.0.1:P_E --port P_S  (engine flags)
    gateway    python -m gateway --host H --port 8000 --scheduler-address .. --tokenizer-address .. --workers N --model-name ..

The three gRPC services start at once (the scheduler connects to the executor when its model is
loaded); the gateway starts when the scheduler and the tokenizer are SERVING. The launcher waits
for every health check (grpc.health.v1, the gateway's GET /health), prints where each listens,
then supervises:
- the executor dying (a crash, the OOM killer) is reported with its exit code and last log lines
  and it is restarted on the same port; the scheduler holds its requests meanwhile and replays
  them (same tokens), so clients only see a pause. At most --max-executor-restarts times.
- any other child dying is reported the same way and the whole stack shuts down (exit code 1).
Ctrl-C / SIGTERM stop everything: SIGTERM to the gateway, then the scheduler (in-flight requests
get --shutdown-grace seconds), then the tokenizer and the executor; SIGKILL for whatever is still
running after the grace. Children also get SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG),
so no orphan keeps a port or GPU memory.

Internal gRPC services bind loopback (--grpc-host); only the gateway's --host faces clients.

`--replicas N` runs N executor + scheduler pairs (replica i: `executor-i`, `scheduler-i`; the first
keeps the plain names and the given ports, the others take free ports) behind the one tokenizer and
gateway, which routes over them (`--routing`, gateway/routing/). Each pair is supervised as above;
services/replica_placement.py gives each executor its GPU, or its share of the CPUs.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXECUTOR_PORT, SCHEDULER_PORT, TOKENIZER_PORT = 50053, 50051, 50052  # services.grpc_server's defaults
GATEWAY_PORT = 8000
LOG_TAIL_LINES = 30


def _say(msg: str) -> None:
    print(f"pagedserve: {msg}", flush=True)


# ---------------------------------------------------------------------------- ports
def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _address(host: str, port: int) -> str:
    host = _connect_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pick_port(host: str, port: int, what: str, taken: set[int] | None = None) -> int:
    """`port` if it can be bound (0: any free port not in `taken`); SystemExit naming the flag
    otherwise. The probe socket is closed on return, so the OS may hand the same free port to the
    next pick: `taken` holds the ports already given to this stack's other services (a scheduler
    and a gateway once both got one, and the second to start could not bind)."""
    while True:
        picked = _probe_port(host, port, what)
        if port or picked not in (taken or ()):
            return picked


def _probe_port(host: str, port: int, what: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers themselves bind (gRPC and uvicorn set SO_REUSEADDR): a port whose last
        # connections sit in TIME-WAIT after a stop is free to them, so it must be free here too
        # (a restart right after a stop used to fail for up to 60 s). A listener still fails.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            flag = "--port" if what == "gateway" else f"--{what}-port"
            raise SystemExit(f"pagedserve: cannot use port {port} for the {what} on {host}: {e.strerror} "
                             f"(another pagedserve?); pass {flag} <port>, or {flag} 0 for any free port") from None
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- children
def _pdeathsig():
    """preexec_fn: SIGTERM this child when the launcher dies (Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_pdeathsig if sys.platform.startswith("linux") else None


_PREEXEC = _pdeathsig()


@dataclass
class Service:
    name: str
    argv: list[str]
    address: str  # host:port clients use (http://... for the gateway)
    health: str  # grpc service name, or "http" for the gateway
    restart: bool = False
    proc: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))
    reader: threading.Thread | None = None
    ready: bool = False
    restarts: int = 0
    # Added to the launcher's environment for the child: secrets and TLS paths (the service token,
    # the API key: never argv), a replica's device placement.
    env: dict[str, str] = field(default_factory=dict)
    cpus: frozenset[int] | None = None  # CPU affinity (replica placement)
    up_since: float = 0.0  # when the current process became healthy (restart budget reset)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, echo: bool) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.tail.clear()
        self.ready = False
        self.up_since = 0.0  # a process that dies before it is healthy does not renew the budget
        preexec = _PREEXEC
        if self.cpus is not None and hasattr(os, "sched_setaffinity"):
            cpus = self.cpus

            def preexec() -> None:
                if _PREEXEC is not None:
                    _PREEXEC()
                os.sched_setaffinity(0, cpus)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                     start_new_session=True,  # Ctrl-C reaches the launcher only
                                     preexec_fn=preexec)  # noqa: PLW1509 - prctl() and sched_setaffinity(), no locks
        self.reader = threading.Thread(target=self._read, args=(self.proc, echo), name=f"log-{self.name}",
                                       daemon=True)
        self.reader.start()

    def _read(self, proc: subprocess.Popen, echo: bool) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            if echo:
                sys.stderr.write(f"[{self.name}] {line}\n")
                sys.stderr.flush()

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            how = f"was killed by {sig} (exit code {rc})"
        else:
            how = f"exited with code {rc}"
        if self.reader is not None:
            self.reader.join(1.0)  # the last lines
        lines = "\n".join(f"    | {x}" for x in self.tail) or "    | (no output)"
        return f"{self.name} (pid {self.pid}) {how}; its last log lines:\n{lines}"


def _check_grpc(address: str, service: str, timeout: float = 1.0, env: dict[str, str] | None = None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.internal_auth import InternalSecurity

    with InternalSecurity.from_env({**os.environ, **(env or {})}).channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _check_http(url: str, timeout: float = 1.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _is_healthy(svc: Service) -> bool:
    return _check_http(svc.address) if svc.health == "http" else _check_grpc(svc.address, svc.health, env=svc.env)


def gateway_available() -> bool:
    try:
        return importlib.util.find_spec("gateway.__main__") is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------- engine flags
def engine_flags(args: argparse.Namespace) -> list[str]:
    """The EngineConfig flags the user changed, as command-line arguments for the children."""
    from engine_core.config import EngineConfig

    out: list[str] = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in ("model", "extra") or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out


def internal_security_env(args: argparse.Namespace) -> dict[str, str]:
    """What every child needs to call the others (services/internal_auth.py): the stack's service
    token (the one in the environment, or a fresh one per stack) and the mTLS files if given."""
    from services.internal_auth import (
        TLS_CA_ENV,
        TLS_CERT_ENV,
        TLS_KEY_ENV,
        TOKEN_ENV,
        TOKEN_FILE_ENV,
        generate_token,
    )

    env: dict[str, str] = {}
    if not os.environ.get(TOKEN_ENV) and not os.environ.get(TOKEN_FILE_ENV):
        # A file only this user can read, so `pagedserve client` can be pointed at it; removed at exit.
        import tempfile

        fd, path = tempfile.mkstemp(prefix="pagedserve-token-")
        with os.fdopen(fd, "w") as f:
            f.write(generate_token())
        env[TOKEN_FILE_ENV] = path
    tls = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls) and not all(tls):
        raise SystemExit("pagedserve: mTLS needs all three of --tls-cert, --tls-key and --tls-ca")
    if all(tls):
        for name, path in zip((TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV), tls):
            env[name] = os.path.abspath(os.path.expanduser(path))
    return env


# ---------------------------------------------------------------------------- the stack
class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop_requested = threading.Event()
        self.swap_requested = threading.Event()
        self.stop_signal: str | None = None
        py = [sys.executable, "-m"]
        gh = args.grpc_host
        taken: set[int] = set()  # ports picked for this stack, not yet bound by their services

        def pick(host: str, port: int, what: str) -> int:
            taken.add(picked := pick_port(host, port, what, taken))
            return picked

        ports = {what: pick(gh, port, what) for what, port in (
            ("executor", args.executor_port), ("tokenizer", args.tokenizer_port), ("scheduler", args.scheduler_port))}
        self.with_gateway = not args.no_gateway and gateway_available()
        if self.with_gateway:
            ports["gateway"] = pick(args.host, args.port, "gateway")
        common = ["--host", gh, "--log-level", args.log_level, "--shutdown-grace", str(args.shutdown_grace)]
        model = [args.model] if args.model else []
        eflags = engine_flags(args)
        from services.executor.server import SERVICE_NAME as EXECUTOR_SERVICE
        from services.scheduler.server import SERVICE_NAME as SCHEDULER_SERVICE
        from services.tokenizer.server import SERVICE_NAME as TOKENIZER_SERVICE

        tokenizer_argv = [*py, "services.tokenizer", *model, "--port", str(ports["tokenizer"]), *common]
        if args.tokenizer:
            tokenizer_argv += ["--tokenizer", args.tokenizer]
        if args.served_model_name:
            tokenizer_argv += ["--served-model-name", args.served_model_name]
        if args.max_model_len:
            tokenizer_argv += ["--max-model-len", str(args.max_model_len)]
        self.tokenizer = Service("tokenizer", tokenizer_argv, _address(gh, ports["tokenizer"]), TOKENIZER_SERVICE)

        from services.replica_placement import replica_placements

        self.executors: list[Service] = []
        self.schedulers: list[Service] = []
        try:
            placements = replica_placements(args.replicas, args.device, cpus_per_replica=args.cpus_per_replica)
        except ValueError as e:
            raise SystemExit(f"pagedserve: {e}") from None
        for i, place in enumerate(placements):
            suffix = f"-{i}" if i else ""
            ex_port = ports["executor"] if i == 0 else pick(gh, 0, "executor")
            sc_port = ports["scheduler"] if i == 0 else pick(gh, 0, "scheduler")
            executor_argv = [*py, "services.executor", *model, "--port", str(ex_port), *common, *eflags]
            # Metrics endpoints face Prometheus like the gateway does: they bind the gateway's --host.
            if args.executor_metrics_port is not None:
                executor_argv += ["--metrics-port", str(args.executor_metrics_port + i), "--metrics-host", args.host]
            if args.executor_factory:
                executor_argv += ["--executor", args.executor_factory]
            executor_address = _address(gh, ex_port)
            scheduler_argv = [*py, "services.scheduler", "--executor-address", executor_address,
                              "--port", str(sc_port), "--max-queue-len", str(args.max_queue_len),
                              "--executor-timeout", str(args.executor_timeout), *common, *eflags]
            if not args.tokenizer and not str(args.model or "").startswith("dummy:"):
                # Structured output compiles grammars against the vocabulary in the scheduler.
                scheduler_argv += ["--tokenizer", args.model or "default"]
            if args.scheduler_metrics_port is not None:
                scheduler_argv += ["--metrics-port", str(args.scheduler_metrics_port + i), "--metrics-host", args.host]
            self.executors.append(Service("executor" + suffix, executor_argv, executor_address, EXECUTOR_SERVICE,
                                          restart=True, env=place.env, cpus=place.cpus))
            self.schedulers.append(Service("scheduler" + suffix, scheduler_argv, _address(gh, sc_port),
                                           SCHEDULER_SERVICE))
            if args.replicas > 1 or place.cpus is not None:
                print(f"replica {i}: scheduler {self.schedulers[-1].address}, executor {executor_address} "
                      f"({place.describe()})", flush=True)
        self.executor, self.scheduler = self.executors[0], self.schedulers[0]
        self.services = [*self.executors, self.tokenizer, *self.schedulers]
        self.gateway: Service | None = None
        if self.with_gateway:
            self.gateway = Service("gateway", [*py, "gateway", "--host", args.host, "--port", str(ports["gateway"]),
                                               "--scheduler-address", ",".join(s.address for s in self.schedulers),
                                               "--routing", args.routing,
                                               "--tokenizer-address", self.tokenizer.address,
                                               "--workers", str(args.gateway_workers)],
                                   f"http://{_address(args.host, ports['gateway'])}", "http")
            # Grace for in-flight streams; the uvicorn timeout behind it is the gateway's business.
            self.gateway.argv += ["--shutdown-grace", str(args.shutdown_grace)]
            if args.metrics_auth:
                self.gateway.argv.append("--metrics-auth")
        from services.internal_auth import resolve_api_key

        try:
            self.api_key = resolve_api_key(args.api_key, args.api_key_file, warn=_say)
        except (OSError, ValueError) as e:
            raise SystemExit(f"pagedserve: --api-key-file: {e}") from None
        child_env = internal_security_env(args)
        from services.internal_auth import TOKEN_FILE_ENV

        self.token_file = child_env.get(TOKEN_FILE_ENV)  # ours to remove
        for s in [*self.services, self.gateway]:
            if s is not None:
                s.env.update(child_env)

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        from services.admin_cli import SWAP_SIGNAL

        def handler(signum, _frame) -> None:
            self.stop_signal = signal.Signals(signum).name
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # `pagedserve admin swap-executor --pid`: handled by the supervision loop.
        signal.signal(SWAP_SIGNAL, lambda _signum, _frame: self.swap_requested.set())

    # ------------------------------------------------------------------ start
    def _wait_ready(self, services: list[Service], timeout: float) -> Service | None:
        """Wait until every service is healthy; returns a service that died (None if all ready).
        SystemExit on timeout; returns early (None) when a stop is requested."""
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while not self.stop_requested.is_set():
            pending = [s for s in services if not s.ready]
            if not pending:
                return None
            for s in pending:
                if s.proc.poll() is not None:
                    return s
                if _is_healthy(s):
                    s.ready = True
                    s.up_since = time.monotonic()
                    where = s.address
                    print(f"{s.name:<10} ready on {where} (pid {s.pid}, {time.monotonic() - t0:.1f}s)", flush=True)
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in services if not s.ready)
                _say(f"timed out after {timeout:.0f}s waiting for {names} to become healthy")
                return next(s for s in services if not s.ready)
            self.stop_requested.wait(0.2)
        return None

    def start(self) -> bool:
        args = self.args
        what = f"{args.replicas} executor + scheduler replicas" if args.replicas > 1 else "executor"
        _say(f"starting {what}, tokenizer and scheduler (model: {args.model or 'embedded SmolLM2'}, "
             f"device: {args.device})")
        for s in self.services:
            s.start(echo=not args.quiet)
        dead = self._wait_ready(self.services, args.startup_timeout)
        if dead is not None:
            self._report_death(dead, during_startup=True)
            return False
        if self.stop_requested.is_set():
            return False
        model_name = args.served_model_name or self._model_name()
        if self.gateway is not None:
            self.gateway.argv += ["--model-name", model_name]
            if self.api_key:  # in the environment: argv shows in `ps`
                from services.internal_auth import API_KEY_ENV

                self.gateway.env[API_KEY_ENV] = self.api_key
            self.gateway.start(echo=not args.quiet)
            self.services.append(self.gateway)
            dead = self._wait_ready([self.gateway], args.startup_timeout)
            if dead is not None:
                self._report_death(dead, during_startup=True)
                return False
            if self.stop_requested.is_set():
                return False
        elif args.no_gateway:
            print("gateway    skipped (--no-gateway)", flush=True)
        else:
            print("gateway    skipped: the gateway package has no gateway/__main__.py yet; use the gRPC "
                  "services directly (pagedserve client ...)", flush=True)
        _say(f"ready: model {model_name}")
        if self.gateway is not None:
            print(f"  OpenAI API: {self.gateway.address}/v1", flush=True)
        for ex, sc in zip(self.executors, self.schedulers):
            print(f"  scheduler:  {sc.address}   tokenizer: {self.tokenizer.address}   "
                  f"executor: {ex.address}", flush=True)
        if self.token_file:
            print(f"  service token: {self.token_file} (export PAGEDSERVE_SERVICE_TOKEN_FILE={self.token_file} "
                  "for pagedserve client and other internal callers)", flush=True)
        print(f"  swap the executor with no downtime: pagedserve admin swap-executor --pid {os.getpid()}",
              flush=True)
        print(f"  try: pagedserve client --scheduler-address {self.scheduler.address} "
              f"--tokenizer-address {self.tokenizer.address} --stream \"Hello\"", flush=True)
        return True

    def _model_name(self) -> str:
        import grpc

        from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
        from services.internal_auth import InternalSecurity

        try:
            with InternalSecurity.from_env({**os.environ, **self.tokenizer.env}).channel(self.tokenizer.address) as ch:
                info = tokenizer_pb2_grpc.TokenizerStub(ch).GetInfo(tokenizer_pb2.GetInfoRequest(), timeout=5)
            return info.model_name or "default"
        except grpc.RpcError:
            return "default"

    # ------------------------------------------------------------------ supervise
    def _report_death(self, svc: Service, during_startup: bool = False) -> None:
        when = "while starting" if during_startup and not svc.ready else "unexpectedly"
        _say(f"{svc.name} died {when}: {svc.describe_exit()}")

    def supervise(self) -> int:
        """Until a stop is requested (0) or a child that is not restarted dies (1)."""
        while not self.stop_requested.wait(0.25):
            if self.swap_requested.is_set():
                self.swap_requested.clear()
                self.swap_executor()
            for s in self.services:
                if s.proc.poll() is None:
                    continue
                self._report_death(s)
                if s.restart and s.up_since and time.monotonic() - s.up_since >= self.args.restart_window:
                    s.restarts = 0  # a crash after a long healthy run starts a fresh budget
                if s.restart and s.restarts < self.args.max_executor_restarts:
                    s.restarts += 1
                    _say(f"restarting the {s.name} ({s.restarts} of at most {self.args.max_executor_restarts}); "
                         f"the scheduler holds and replays its in-flight requests")
                    s.start(echo=not self.args.quiet)
                    threading.Thread(target=self._announce_ready, args=(s,), daemon=True).start()
                    continue
                if s.restart:
                    _say(f"the {s.name} died {s.restarts + 1} times; giving up")
                _say("shutting down the stack")
                return 1
        return 0

    def _announce_ready(self, svc: Service) -> None:
        proc = svc.proc
        t0 = time.monotonic()
        while svc.proc is proc and proc.poll() is None and not self.stop_requested.is_set():
            if _is_healthy(svc):
                svc.ready = True
                svc.up_since = time.monotonic()
                print(f"{svc.name:<10} ready on {svc.address} (pid {svc.pid}, restarted in "
                      f"{time.monotonic() - t0:.1f}s)", flush=True)
                return
            time.sleep(0.25)

    # ------------------------------------------------------------------ executor swap
    def swap_executor(self) -> bool:
        """Zero-downtime swap of every replica's executor, one replica at a time."""
        ok = True
        for i in range(len(self.executors)):  # every replica, even after one refused
            ok = self._swap_replica_executor(i) and ok
        return ok

    def _swap_replica_executor(self, i: int) -> bool:
        """A new executor process on a free port, SERVING, then replica i's scheduler moves its
        requests onto it (SchedulerAdmin.SwapExecutor), then the old one is stopped."""
        import grpc

        from services.admin_cli import swap_executor
        from services.internal_auth import InternalSecurity

        old, scheduler = self.executors[i], self.schedulers[i]
        gh = self.args.grpc_host
        port = pick_port(gh, 0, "executor")
        argv = list(old.argv)
        argv[argv.index("--port") + 1] = str(port)
        new = Service(old.name, argv, _address(gh, port), old.health, restart=True, env=dict(old.env), cpus=old.cpus)
        _say(f"swapping the executor: starting a new one on {new.address}")
        new.start(echo=not self.args.quiet)
        t0 = time.monotonic()
        while not _is_healthy(new):
            if new.proc.poll() is not None or self.stop_requested.is_set() or \
                    time.monotonic() - t0 > self.args.startup_timeout:
                _say(f"executor swap abandoned: the new executor did not become ready ({new.describe_exit()})"
                     if new.proc.poll() is not None else "executor swap abandoned")
                self._stop_service(new)
                return False
            time.sleep(0.25)
        new.ready, new.up_since = True, time.monotonic()
        try:
            r = swap_executor(scheduler.address, new.address,
                              InternalSecurity.from_env({**os.environ, **scheduler.env}))
        except grpc.RpcError as e:
            _say(f"executor swap refused by the scheduler: {e.code().name}: {e.details()}; keeping {old.address}")
            self._stop_service(new)
            return False
        self.services[self.services.index(old)] = new
        self.executors[i] = new
        self.executor = self.executors[0]
        _say(f"executor swapped: {old.address} (pid {old.pid}) -> {new.address} (pid {new.pid}); "
             f"{r.replayed_requests} requests replayed, engine paused {r.switch_s * 1000:.0f} ms")
        self._stop_service(old)
        return True

    def _stop_service(self, svc: Service) -> None:
        if svc.proc is None or svc.proc.poll() is not None:
            return
        svc.proc.send_signal(signal.SIGTERM)
        try:
            svc.proc.wait(self.args.shutdown_grace + 3.0)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait(5)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        grace = self.args.shutdown_grace
        order = [[self.gateway], self.schedulers, [self.tokenizer, *self.executors]]
        for group in order:
            procs = [s for s in group if s is not None and s.proc is not None and s.proc.poll() is None]
            for s in procs:
                try:
                    s.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace + 3.0
            for s in procs:
                try:
                    s.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _say(f"{s.name} (pid {s.pid}) did not stop within {grace + 3.0:.0f}s; killing it")
                    s.proc.kill()
                    s.proc.wait(5)
        for s in self.services:
            if s.reader is not None:
                s.reader.join(1.0)
        if self.token_file:
            with contextlib.suppress(OSError):
                os.unlink(self.token_file)
        _say("stopped")


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.model_flag:
        args.model = args.model_flag
    from engine_core.spec_decode.config import SpeculativeConfig
    try:  # a bad --speculative-config fails here, not in every child
        SpeculativeConfig.parse(getattr(args, "speculative_config", None))
    except ValueError as e:
        print(f"pagedserve serve: {e}", file=sys.stderr)
        return 2
    try:
        stack = Stack(args)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    stack.install_signal_handlers()
    rc = 1
    try:
        if stack.start():
            rc = stack.supervise()
        elif stack.stop_requested.is_set():
            rc = 0
    finally:
        if stack.stop_signal:
            _say(f"received {stack.stop_signal}, stopping")
        stack.shutdown()
    return rc


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from engine_core.config import EngineConfig

    p = subparsers.add_parser(
        "serve", help="run the whole stack: executor, tokenizer, scheduler and gateway",
        description="Start the executor, tokenizer, scheduler and gateway services as supervised child processes.")
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, HF model directory or dummy:<config dir>; default: the embedded SmolLM2")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("addresses")
    g.add_argument("--host", default="127.0.0.1", help="the gateway's bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=GATEWAY_PORT, help=f"the gateway's port (default {GATEWAY_PORT})")
    g.add_argument("--grpc-host", default="127.0.0.1", help="bind address of the internal gRPC services")
    g.add_argument("--executor-port", type=int, default=EXECUTOR_PORT, help=f"default {EXECUTOR_PORT}; 0: any free port")
    g.add_argument("--scheduler-port", type=int, default=SCHEDULER_PORT,
                   help=f"default {SCHEDULER_PORT}; 0: any free port")
    g.add_argument("--tokenizer-port", type=int, default=TOKENIZER_PORT,
                   help=f"default {TOKENIZER_PORT}; 0: any free port")
    g.add_argument("--scheduler-metrics-port", type=int, default=None,
                   help="serve the scheduler's Prometheus metrics on --host:PORT/metrics (e.g. 9051; default off)")
    g.add_argument("--executor-metrics-port", type=int, default=None,
                   help="serve the executor's Prometheus metrics on --host:PORT/metrics (e.g. 9053; default off)")
    g = p.add_argument_group("serving")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: from the model)")
    g.add_argument("--api-key", default=None,
                   help="require this bearer token at the gateway (shows in `ps`: prefer $PAGEDSERVE_API_KEY "
                        "or --api-key-file)")
    g.add_argument("--api-key-file", default=None, help="file holding the gateway's API key")
    g.add_argument("--metrics-auth", action="store_true",
                   help="the gateway's /metrics needs the API key too (the dashboard always does when one is set)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate for mTLS between the internal services")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA that signs --tls-cert (clients and servers)")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="waiting requests beyond which new ones get HTTP 429 / RESOURCE_EXHAUSTED (0: unlimited)")
    g.add_argument("--executor-timeout", type=float, default=30.0,
                   help="seconds requests wait for a dead/restarting executor before failing (default 30)")
    g.add_argument("--gateway-workers", type=int, default=1,
                   help="gateway worker processes sharing the port (each has its own scheduler stream; "
                        "default 1)")
    g.add_argument("--no-gateway", action="store_true", help="only the gRPC services")
    g.add_argument("--replicas", type=int, default=1,
                   help="executor + scheduler pairs behind the gateway (default 1); CUDA: one GPU each, "
                        "CPU: the cores split between them")
    g.add_argument("--routing", default="prefix", choices=["prefix", "least-load", "round-robin"],
                   help="the gateway's routing over the replicas (default prefix)")
    g.add_argument("--cpus-per-replica", type=int, default=None,
                   help="CPU device: pin each replica's executor to this many cores (default: the cores split "
                        "evenly between replicas; one replica unpinned)")
    g = p.add_argument_group("supervision")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for health checks")
    g.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds in-flight requests get on shutdown before children are killed")
    g.add_argument("--max-executor-restarts", type=int, default=5,
                   help="executor restarts allowed within --restart-window (default 5)")
    g.add_argument("--restart-window", type=float, default=600.0,
                   help="seconds an executor must stay healthy for its restart budget to start over (default 600)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level of the services")
    g.add_argument("--quiet", action="store_true", help="do not echo the services' logs (stderr)")
    g.add_argument("--executor-factory", default=None, help=argparse.SUPPRESS)  # tests: a fake executor
    EngineConfig.add_cli_args(p.add_argument_group("engine"))
    p.set_defaults(func=_cmd_serve)
    return p
