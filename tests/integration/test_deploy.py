"""The docker compose wiring, proved without a Docker engine (issue 9 acceptance).

docker-compose.yml merged with docker-compose.cpu.yml is read the way Compose reads it; each
service of the default profile is started from its own `command` and `environment` as a local
process on 127.0.0.1 (every container port remapped to a free local port, every service host
name replaced by 127.0.0.1, `0.0.0.0` binds by 127.0.0.1, `python` by this interpreter and
`pagedserve` by `python -m services.cli`), in `depends_on` order, each one waited on with the
healthcheck command the file declares (at its start_interval, with its timeout). Then one chat
completion goes through the gateway's published port.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy_support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    ROOT,
    default_services,
    duration_s,
    flag_value,
    healthcheck_argv,
    load_compose,
)

pytestmark = pytest.mark.timeout(120)
STARTUP_BUDGET_S = 90.0  # all four healthy (about 15 s on 2 idle cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_ports(svc: dict) -> set[int]:
    """The ports a service's container listens on: --port, expose, the container side of ports."""
    ports = {int(p) for p in svc.get("expose", [])}
    for p in svc.get("ports", []):
        ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    port = flag_value(svc["command"], "--port")
    if port is not None:
        ports.add(int(port))
    return ports


class LocalCompose:
    """Runs a compose model's services as local processes (see the module docstring)."""

    def __init__(self, model: dict, log_dir: Path, host_env: dict[str, str]) -> None:
        self.services = default_services(model)
        self.host_env = host_env
        self.log_dir = log_dir
        # (service, container port) -> local port
        self.ports = {(name, p): _free_port() for name, svc in self.services.items() for p in container_ports(svc)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    # -------------------------------------------------------------- rewriting
    def _rewrite_token(self, service: str, token: str) -> str:
        def sub(m: re.Match) -> str:
            host, port = m.group("host"), int(m.group("port"))
            if host in ("127.0.0.1", "localhost", "0.0.0.0"):  # this container's own port
                target = service
            elif host in self.services:
                target = host
            else:
                return m.group(0)
            return f"127.0.0.1:{self.ports[(target, port)]}"

        token = re.sub(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)", sub, token)
        return "127.0.0.1" if token == "0.0.0.0" else token

    def rewrite(self, service: str, argv: list[str]) -> list[str]:
        if argv[0] in ("python", "python3"):
            argv = [sys.executable, *argv[1:]]
        elif argv[0] == "pagedserve":
            argv = [sys.executable, "-m", "services.cli", *argv[1:]]
        out = []
        for i, a in enumerate(argv):
            if i > 0 and argv[i - 1] in ("--port", "--metrics-port"):
                a = str(self.ports[(service, int(a))])
            out.append(self._rewrite_token(service, a))
        return out

    def environment(self, svc: dict) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        for k in ("PAGEDSERVE_API_KEY", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            env.pop(k, None)  # only what the compose file gives
        for k, v in (svc.get("environment") or {}).items():
            if v is None:  # pass-through: the host's value if it has one
                if k in self.host_env:
                    env[k] = self.host_env[k]
            else:
                env[k] = str(v)
        return env

    # -------------------------------------------------------------- lifecycle
    def start(self, name: str) -> None:
        svc = self.services[name]
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(self.rewrite(name, svc["command"]), cwd=ROOT, env=self.environment(svc),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def healthy(self, name: str) -> bool:
        hc = self.services[name]["healthcheck"]
        argv = self.rewrite(name, healthcheck_argv(self.services[name]))
        try:
            return subprocess.run(argv, check=False, cwd=ROOT, env=self.environment(self.services[name]), capture_output=True,
                                  timeout=duration_s(hc.get("timeout"), 30)).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def up(self, budget_s: float) -> None:
        """`docker compose up --wait`: start each service once its dependencies are healthy."""
        t0 = time.monotonic()
        pending = set(self.services)
        healthy: set[str] = set()
        next_check: dict[str, float] = {}
        while pending or set(self.procs) - healthy:
            for name in sorted(pending):
                deps = self.services[name].get("depends_on") or {}
                for dep, cond in deps.items():
                    assert cond.get("condition") == "service_healthy", (name, dep)
                if set(deps) <= healthy:
                    self.start(name)
                    pending.discard(name)
                    next_check[name] = time.monotonic()
            for name in sorted(set(self.procs) - healthy):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
                if time.monotonic() >= next_check[name]:
                    if self.healthy(name):
                        healthy.add(name)
                        self.timings[name] = time.monotonic() - t0
                    else:
                        hc = self.services[name]["healthcheck"]
                        next_check[name] = time.monotonic() + duration_s(
                            hc.get("start_interval") or hc.get("interval"), 5)
            if time.monotonic() - t0 > budget_s:
                waiting = sorted(set(self.services) - healthy)
                raise AssertionError(f"not healthy after {budget_s:.0f}s: {waiting}\n"
                                     + "\n".join(self.tail(n) for n in waiting if n in self.procs))
            time.sleep(0.2)

    def tail(self, name: str, n: int = 30) -> str:
        lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-n:]
        return f"--- {name} ---\n" + "\n".join(lines)

    def down(self) -> None:
        """Stop in reverse dependency order (SIGTERM, then SIGKILL after the grace)."""
        for name in ("gateway", "scheduler", "tokenizer", "executor"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def published_url(self, name: str) -> str:
        (spec,) = self.services[name]["ports"]
        container_port = int(str(spec).rsplit(":", 1)[-1])
        return f"http://127.0.0.1:{self.ports[(name, container_port)]}"


def test_compose_cpu_stack_serves_a_chat_completion(tmp_path):
    t0 = time.monotonic()
    host_env: dict[str, str] = {}  # interpolation sees no PAGEDSERVE_* variables: the file's defaults
    model = load_compose([COMPOSE_FILE, COMPOSE_CPU_FILE], host_env)
    stack = LocalCompose(model, tmp_path, host_env)
    assert set(stack.services) == {"executor", "scheduler", "tokenizer", "gateway"}
    try:
        stack.up(STARTUP_BUDGET_S)
        startup = time.monotonic() - t0
        base = stack.published_url("gateway")
        with httpx.Client(base_url=base, timeout=60) as client:
            models = client.get("/v1/models")
            assert models.status_code == 200, models.text
            model_id = models.json()["data"][0]["id"]
            r = client.post("/v1/chat/completions", json={
                "model": model_id, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["role"] == "assistant"
            assert body["choices"][0]["message"]["content"]
            assert 0 < body["usage"]["completion_tokens"] <= 8
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
        print(f"\ncompose stack healthy in {startup:.1f}s "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in sorted(stack.timings.items(), key=lambda kv: kv[1]))}); "
              f"total {time.monotonic() - t0:.1f}s")
    finally:
        stack.down()
    # SIGTERM is a graceful stop within the grace: exit 0, or the re-raised SIGTERM (uvicorn does
    # that after its graceful shutdown); never the SIGKILL of `down()`
    for name, proc in stack.procs.items():
        assert proc.returncode in (0, -signal.SIGTERM), f"{name} exited {proc.returncode}\n{stack.tail(name)}"
