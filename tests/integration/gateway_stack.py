"""Test harness for the gateway: an in-process stack (real tokenizer service + FakeScheduler +
gateway under uvicorn, all on one event loop in a background thread) and helpers to run the real
stack as subprocesses (executor, scheduler, tokenizer, gateway) on free 127.0.0.1 ports."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

from gateway.__main__ import bind
from gateway.app import create_app
from gateway.config import GatewayConfig
from services.gen.pagedserve.v1 import (
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2_grpc,
)
from services.grpc_server import AioGrpcServer
from services.tokenizer.server import SERVICE_NAME as TOKENIZER_SERVICE
from services.tokenizer.server import TokenizerServicer
from tests.integration.loop_thread import LoopThread

ROOT = Path(__file__).resolve().parents[2]
SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class InProcessStack:
    """Everything on one loop thread; `start_*` return addresses / base URLs."""

    def __init__(self) -> None:
        self.lt = LoopThread(name="gateway-test-loop", default_timeout=60)
        self._grpc: list[AioGrpcServer] = []
        self._http: list[tuple[uvicorn.Server, asyncio.Future]] = []

    def start_tokenizer(self, tokenizer, max_model_len: int = 256) -> str:
        async def go():
            srv = AioGrpcServer("tokenizer", [TOKENIZER_SERVICE], "127.0.0.1", 0, grace_s=0.2)
            tokenizer_pb2_grpc.add_TokenizerServicer_to_server(
                TokenizerServicer(tokenizer, max_model_len=max_model_len), srv.server)
            await srv.start()
            await srv.set_serving(True)
            return srv

        srv = self.lt.run(go())
        self._grpc.append(srv)
        return srv.address

    def start_scheduler(self, servicer) -> str:
        async def go():
            srv = AioGrpcServer("scheduler", [SCHEDULER_SERVICE], "127.0.0.1", 0, grace_s=0.2)
            scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, srv.server)
            await srv.start()
            await srv.set_serving(True)
            return srv

        srv = self.lt.run(go())
        self._grpc.append(srv)
        return srv.address

    def start_gateway(self, config: GatewayConfig) -> str:
        async def go():
            sock = bind("127.0.0.1", 0)
            server = uvicorn.Server(uvicorn.Config(create_app(config), log_config=None, access_log=False,
                                                   timeout_graceful_shutdown=1))
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            for _ in range(500):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.01)
            if task.done():
                task.result()
            return server, task, sock.getsockname()[1]

        server, task, port = self.lt.run(go())
        self._http.append((server, task))
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        async def stop():
            for server, _ in self._http:
                server.should_exit = True
            for _, task in self._http:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)
            for srv in self._grpc:
                await srv.stop(0)

        try:
            self.lt.run(stop(), timeout=20)
        finally:
            self.lt.close()


# ---------------------------------------------------------------------------- real processes
_LISTEN = re.compile(r"listening on (\S+)")
_METRICS = re.compile(r"^(\w+) metrics on http://(\S+)/metrics")


class Proc:
    """A `python -m ...` child whose `<name> listening on HOST:PORT` line gives its address."""

    def __init__(self, args: list[str], name: str, timeout: float = 120, env: dict | None = None) -> None:
        self.name = name
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"X": None} removes X
        self.p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=full_env)
        self.lines: list[str] = []
        self.address: str | None = None
        self.metrics_address: str | None = None  # `<name> metrics on http://HOST:PORT/metrics` (--metrics-port)
        ready = threading.Event()

        def pump() -> None:
            for line in self.p.stdout:
                self.lines.append(line)
                mm = _METRICS.match(line)
                if mm and mm.group(1) == name:
                    self.metrics_address = mm.group(2)
                m = _LISTEN.search(line)
                if m and self.address is None and line.startswith(f"{name} listening"):
                    self.address = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.address is None:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n{self.output()}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def wait_until(pred, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
