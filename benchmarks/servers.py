"""Start and stop the servers the serving benchmarks drive: `pagedserve serve` (the whole stack,
free ports) and the naive HF baseline (benchmarks/baselines/hf_server.py). Each is a child process
whose stdout announces its URL; used by benchmarks/seed_demo.py and tests/integration."""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FREE_PORTS = ["--port", "0", "--executor-port", "0", "--scheduler-port", "0", "--tokenizer-port", "0"]
# `pagedserve serve` prints "  OpenAI API: http://HOST:PORT/v1" and "gateway    ready on http://HOST:PORT (...)".
PAGEDSERVE_READY = re.compile(r"OpenAI API:\s*(https?://\S+?)(?:/v1)?\s*$|^gateway\s+ready on (https?://\S+)")
PAGEDSERVE_NO_GATEWAY = re.compile(r"^gateway\s+skipped")
HF_READY = re.compile(r"hf_server listening on (\S+)")


class ServerProcess:
    """A child process; `url` is set from the first stdout line matching `ready`."""

    def __init__(self, name: str, argv: list[str], ready: re.Pattern, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, fail: re.Pattern | None = None) -> None:
        self.name, self.argv, self.ready_rx, self.fail_rx = name, argv, ready, fail
        self.url: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=80)
        self._ready = threading.Event()
        self._failed: str | None = None
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"log-{name}")
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            if self._log:
                self._log.write(line)
                self._log.flush()
            if self.url is None:
                m = self.ready_rx.search(line.rstrip("\n"))
                if m:
                    url = next(g for g in m.groups() if g)
                    self.url = url if url.startswith("http") else f"http://{url}"
                    self._ready.set()
                elif self.fail_rx is not None and self.fail_rx.search(line):
                    self._failed = line.strip()
                    self._ready.set()
        self._ready.set()

    def output(self, n: int = 40) -> str:
        return "\n".join(list(self.tail)[-n:])

    def wait_ready(self, timeout: float = 600.0) -> str:
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; its last lines:\n{self.output()}")
        if self.url is None:
            why = self._failed or f"exited with code {self.proc.poll()}"
            self.stop()
            raise RuntimeError(f"{self.name} did not start ({why}); its last lines:\n{self.output()}")
        return self.url

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (the launcher then stops its children), SIGKILL to the group after `grace`."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._reader.join(2)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_pagedserve(model: str | None = None, device: str = "cpu", extra: list[str] | None = None,
                     log_path: str | os.PathLike | None = None, env: dict | None = None) -> ServerProcess:
    """`pagedserve serve`; `.service_token` is the token its internal services want (given in `env`
    or this process's environment, else a fresh one) for clients that call them directly."""
    from services.internal_auth import TOKEN_ENV, generate_token

    argv = [sys.executable, "-m", "services.cli", "serve", *([model] if model else []), *FREE_PORTS,
            "--device", device, *(extra or [])]
    token = (env or {}).get(TOKEN_ENV) or os.environ.get(TOKEN_ENV) or generate_token()
    server = ServerProcess("pagedserve", argv, PAGEDSERVE_READY, env={**(env or {}), TOKEN_ENV: token},
                           log_path=log_path, fail=PAGEDSERVE_NO_GATEWAY)
    server.service_token = token
    return server


def start_hf_server(model: str | None = None, dummy_config: str | None = None, device: str = "cpu",
                    extra: list[str] | None = None, log_path: str | os.PathLike | None = None,
                    env: dict | None = None) -> ServerProcess:
    argv = [sys.executable, str(ROOT / "benchmarks" / "baselines" / "hf_server.py"), "--port", "0", "--device", device]
    if model:
        argv += ["--model", model]
    if dummy_config:
        argv += ["--dummy-config", dummy_config]
    return ServerProcess("hf_server", argv + list(extra or []), HF_READY, env=env, log_path=log_path)


def wait_healthy(url: str, timeout: float = 60.0) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False
