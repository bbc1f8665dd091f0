"""`pagedserve serve` as a subprocess: starts and health-checks every service, prints where each
listens, `pagedserve client --stream` works against it, a killed executor is restarted (its
in-flight request replayed), any other dead child takes the stack down with a clear report, and
SIGTERM stops every child (no orphans)."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2_grpc
from services.gen.pagedserve.v1 import scheduler_pb2 as pb
from services.internal_auth import TOKEN_ENV, InternalSecurity
from tests.integration.fake_executor import FakeExecutor

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(150)
FREE_PORTS = ["--port", "0", "--executor-port", "0", "--scheduler-port", "0", "--tokenizer-port", "0"]
_BIN = Path(sys.executable).parent / "pagedserve"
PAGEDSERVE = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "services.cli"]
READY = re.compile(r"^(\w+)\s+ready on (\S+) \(pid (\d+)")
TOKEN = "launcher-test-service-token"  # the stack's internal services want it (services/internal_auth.py)
SECURITY = InternalSecurity(token=TOKEN)


class Launcher:
    def __init__(self, log: Path, *args: str, env_extra: dict | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **{TOKEN_ENV: TOKEN, **(env_extra or {})})
        self.log = log
        self.proc = subprocess.Popen([*PAGEDSERVE, "serve", *FREE_PORTS, *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"))  # noqa: SIM115
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n" + "\n".join(self.out)) from None
            if line is None:
                raise AssertionError(f"launcher exited ({self.proc.wait()}) before {pattern!r}:\n" + "\n".join(self.out)
                                     + "\n--- stderr ---\n" + self.log.read_text()[-3000:])
            self.out.append(line)
            m = rx.search(line)
            if m:
                return m

    def wait_ready(self) -> dict[str, tuple[str, int]]:
        """{service: (address, pid)} from the `NAME ready on ADDR (pid N, ...)` lines."""
        services: dict[str, tuple[str, int]] = {}
        self.wait_for(r"^pagedserve: ready")
        for line in self.out:
            m = READY.match(line)
            if m:
                services[m.group(1)] = (m.group(2), int(m.group(3)))
        return services

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if alive(p)]
        time.sleep(0.1)


def test_serve_client_and_sigterm(tmp_path):
    """The real stack on the embedded SmolLM2: every service ready, the CLI client streams text,
    SIGTERM stops everything with exit code 0."""
    launcher = Launcher(tmp_path / "serve.log", "--device", "cpu", "--max-model-len", "256",
                        "--num-gpu-blocks-override", "64", "--shutdown-grace", "2")
    try:
        services = launcher.wait_ready()
        assert {"executor", "tokenizer", "scheduler"} <= set(services)
        gateway_line = next(x for x in launcher.out if x.startswith("gateway"))
        assert "ready on http://" in gateway_line or "skipped" in gateway_line
        if "gateway" in services:
            import httpx

            assert httpx.get(f"{services['gateway'][0]}/health", timeout=10).status_code == 200
        sched, tok = services["scheduler"][0], services["tokenizer"][0]
        launcher.wait_for(rf"try: pagedserve client --scheduler-address {sched} --tokenizer-address {tok}", 5)
        r = subprocess.run([*PAGEDSERVE, "client", "Hello", "--stream", "--max-tokens", "8",
                            "--scheduler-address", sched, "--tokenizer-address", tok],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                           env={**os.environ, TOKEN_ENV: TOKEN})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip(), r
        assert "completion tokens" in r.stderr
        pids = [pid for _, pid in services.values()]
        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.proc.wait(30) == 0
        wait_gone(pids)
        launcher.wait_for(r"^pagedserve: stopped", timeout=5)
    finally:
        launcher.kill()


def test_executor_restart_and_dead_child_shutdown(tmp_path):
    """Fake executor (fast): a killed executor is restarted and the in-flight request completes
    with the same tokens; a killed tokenizer is reported (exit code, log tail) and the whole stack
    goes down with exit code 1."""
    launcher = Launcher(tmp_path / "serve.log", "--executor-factory", "tests.integration.fake_executor:slow_fake_executor",
                        "--no-gateway", "--max-model-len", "256", "--num-gpu-blocks-override", "32",
                        "--shutdown-grace", "1", "--executor-timeout", "60",
                        env_extra={"FAKE_EXECUTOR_STEP_DELAY_S": "0.03"})
    try:
        services = launcher.wait_ready()
        assert "gateway    skipped (--no-gateway)" in launcher.out
        with SECURITY.channel(services["scheduler"][0]) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            call = stub.Generate(pb.GenerateRequest(request_id="r", prompt_token_ids=[4, 5, 6],
                                                    sampling_params=common_pb2.SamplingParams(max_tokens=80)),
                                 timeout=60)
            tokens = list(next(call).token_ids)
            os.kill(services["executor"][1], signal.SIGKILL)
            launcher.wait_for(r"executor died unexpectedly: executor \(pid \d+\) was killed by SIGKILL")
            launcher.wait_for(r"restarting the executor \(1 of at most 5\)")
            new = launcher.wait_for(r"^executor\s+ready on \S+ \(pid (\d+), restarted")
            for msg in call:
                tokens += msg.token_ids
            expected = [4, 5, 6]
            for _ in range(80):
                expected.append(FakeExecutor.next_token(expected[-1], len(expected)))
            assert tokens == expected[3:]
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
            assert stats.executor_restarts == 1 and stats.executor_healthy
        pids = [pid for name, (_, pid) in services.items() if name != "executor"] + [int(new.group(1))]
        os.kill(services["tokenizer"][1], signal.SIGKILL)
        report = launcher.wait_for(r"tokenizer died unexpectedly: .*killed by SIGKILL.*")
        assert "exit code -9" in report.group(0)
        assert launcher.proc.wait(30) == 1
        text = "\n".join(launcher.out) + "\n" + "\n".join(iter(launcher.lines.get, None))
        assert "tokenizer listening on" in text  # the dead child's last log lines are shown
        assert "shutting down the stack" in text and "pagedserve: stopped" in text
        wait_gone(pids)
    finally:
        launcher.kill()


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([*PAGEDSERVE, "serve", "--scheduler-port", str(port), "--port", "0", "--executor-port",
                            "0", "--tokenizer-port", "0"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert f"cannot use port {port} for the scheduler" in r.stderr and "--scheduler-port 0" in r.stderr


def test_secrets_restart_budget_and_grace(tmp_path):
    """Issue 16 (findings 2, 3, 7) through the launcher, on the fake executor: the API key reaches the
    gateway through the environment (not in any argv), /dashboard needs it; the stack's generated
    service token guards the scheduler (in a 0600 file, removed at exit); the gateway gets
    --shutdown-grace; the executor's restart budget starts over after a healthy --restart-window."""
    import stat

    import httpx

    key_file = tmp_path / "key"
    key_file.write_text("sk-launcher-test\n")
    launcher = Launcher(tmp_path / "serve.log", "--executor-factory", "tests.integration.fake_executor:FakeExecutor",
                        "--max-model-len", "256", "--num-gpu-blocks-override", "32", "--shutdown-grace", "2",
                        "--max-executor-restarts", "1", "--restart-window", "1", "--api-key-file", str(key_file),
                        env_extra={TOKEN_ENV: ""})
    try:
        services = launcher.wait_ready()
        token_file = launcher.wait_for(r"service token: (\S+) ", 5).group(1)
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        gw_url, gw_pid = services["gateway"]
        argv = Path(f"/proc/{gw_pid}/cmdline").read_bytes().split(b"\0")
        assert not any(b"sk-launcher-test" in a for a in argv)
        assert b"--shutdown-grace" in argv and argv[argv.index(b"--shutdown-grace") + 1] == b"2.0"
        for _, pid in services.values():
            assert b"sk-launcher-test" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        auth = {"Authorization": "Bearer sk-launcher-test"}
        body = {"prompt": [1, 2, 3], "max_tokens": 2}
        assert httpx.post(f"{gw_url}/v1/completions", json=body, timeout=30).status_code == 401
        assert httpx.post(f"{gw_url}/v1/completions", json=body, headers=auth, timeout=30).status_code == 200
        assert httpx.get(f"{gw_url}/dashboard", timeout=10).status_code == 401
        assert httpx.get(f"{gw_url}/dashboard", auth=("", "sk-launcher-test"), timeout=10).status_code == 200
        with InternalSecurity().channel(services["scheduler"][0]) as ch, \
                pytest.raises(Exception, match="UNAUTHENTICATED"):
            scheduler_pb2_grpc.SchedulerStub(ch).GetStats(pb.GetStatsRequest(), timeout=5)
        token = Path(token_file).read_text().strip()
        with InternalSecurity(token=token).channel(services["scheduler"][0]) as ch:
            assert scheduler_pb2_grpc.SchedulerStub(ch).GetStats(pb.GetStatsRequest(), timeout=5).executor_healthy
        # Two crashes, each after more than --restart-window of health: both restarted (budget 1).
        pid = services["executor"][1]
        for _ in range(2):
            time.sleep(1.2)
            os.kill(pid, signal.SIGKILL)
            launcher.wait_for(r"restarting the executor \(1 of at most 1\)")
            pid = int(launcher.wait_for(r"^executor\s+ready on \S+ \(pid (\d+), restarted").group(1))
        assert launcher.proc.poll() is None
        launcher.proc.send_signal(signal.SIGTERM)
        assert launcher.proc.wait(30) == 0
        assert not os.path.exists(token_file)
    finally:
        launcher.kill()
