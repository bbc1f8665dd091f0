"""Issue 16: zero-downtime executor swap. A scheduler process with 16 streams in flight on executor A
is told (SchedulerAdmin.SwapExecutor) to move to executor B: every stream completes with exactly the
tokens an undisturbed run gives (the fake executor's tokens are a pure function of the sequence, as
greedy decoding is), A can then be stopped, and a swap to an executor with another KV geometry or
to one that is not up is refused without touching the running requests."""
from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
import pytest

from services.gen.pagedserve.v1 import admin_pb2, admin_pb2_grpc, scheduler_pb2_grpc
from services.gen.pagedserve.v1 import scheduler_pb2 as pb
from tests.integration.test_launcher import PAGEDSERVE, ROOT
from tests.integration.test_scheduler_service import (
    FAKE_EXECUTOR,
    collect,
    expected_tokens,
    gen_req,
    spawn,
)

pytestmark = pytest.mark.timeout(120)
STREAMS = 16
MAX_TOKENS = 60


def test_swap_executor_during_16_streams():
    env = {"FAKE_EXECUTOR_STEP_DELAY_S": "0.02"}
    procs = []
    try:
        a, a_addr = spawn("services.executor", *FAKE_EXECUTOR, "--port", "0", env_extra=env)
        b, b_addr = spawn("services.executor", *FAKE_EXECUTOR, "--port", "0", env_extra=env)
        procs += [a, b]
        other_args = [x if x != "64" else "48" for x in FAKE_EXECUTOR]  # other KV geometry
        c, c_addr = spawn("services.executor", *other_args, "--port", "0", env_extra=env)
        sch, addr = spawn("services.scheduler", "--executor-address", a_addr, "--port", "0", "--max-num-seqs",
                          str(STREAMS), "--shutdown-grace", "1")
        procs += [c, sch]
        with grpc.insecure_channel(addr) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            admin = admin_pb2_grpc.SchedulerAdminStub(ch)
            for _ in range(300):  # connected to A
                if stub.GetStats(pb.GetStatsRequest(), timeout=5).executor_healthy:
                    break
                time.sleep(0.1)
            prompts = [[i + 1, i + 2, i + 3] for i in range(STREAMS)]
            calls = [stub.Generate(gen_req(f"s{i}", p, max_tokens=MAX_TOKENS, temperature=0.0,
                                      ignore_eos=True), timeout=60)
                     for i, p in enumerate(prompts)]
            results: list = [None] * STREAMS
            firsts = [threading.Event() for _ in range(STREAMS)]

            def read(i: int) -> None:
                toks: list[int] = []
                try:
                    for msg in calls[i]:
                        toks += msg.token_ids
                        if len(toks) >= 5:
                            firsts[i].set()
                    results[i] = toks
                except grpc.RpcError as e:
                    results[i] = e
                    firsts[i].set()

            threads = [threading.Thread(target=read, args=(i,)) for i in range(STREAMS)]
            for t in threads:
                t.start()
            for f in firsts:
                assert f.wait(30)
            # refused swaps leave the streams alone
            with pytest.raises(grpc.RpcError) as ei:
                admin.SwapExecutor(admin_pb2.SwapExecutorRequest(executor_address=c_addr), timeout=30)
            assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "num_kv_blocks" in ei.value.details()
            with pytest.raises(grpc.RpcError) as ei:
                admin.SwapExecutor(admin_pb2.SwapExecutorRequest(executor_address="127.0.0.1:1", timeout_s=1),
                                   timeout=30)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            t0 = time.monotonic()
            resp = admin.SwapExecutor(admin_pb2.SwapExecutorRequest(executor_address=b_addr), timeout=30)
            took = time.monotonic() - t0
            assert resp.old_executor_address == a_addr and resp.new_executor_address == b_addr
            assert 0 < resp.replayed_requests <= STREAMS
            a.send_signal(signal.SIGTERM)  # the old executor goes away: nobody notices
            assert a.wait(10) == 0
            for t in threads:
                t.join(60)
            for i, p in enumerate(prompts):
                assert results[i] == expected_tokens(p, MAX_TOKENS), (i, results[i])
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
            assert stats.executor_healthy and stats.num_running == 0
            # and it keeps serving on B
            assert collect(stub.Generate(gen_req("after", (7, 8, 9), max_tokens=4), timeout=30)) == \
                {0: expected_tokens((7, 8, 9), 4)}
            # the operator command, for an executor started by someone else
            d, d_addr = spawn("services.executor", *FAKE_EXECUTOR, "--port", "0", env_extra=env)
            procs.append(d)
            r = subprocess.run([*PAGEDSERVE, "admin", "swap-executor", "--scheduler-address", addr,
                                "--executor-address", d_addr], cwd=ROOT, capture_output=True, text=True, timeout=60,
                               check=False)
            assert r.returncode == 0 and f"swapped {b_addr} -> {d_addr}" in r.stdout, (r.stdout, r.stderr)
            assert collect(stub.Generate(gen_req("on-d", (7, 8, 9), max_tokens=4), timeout=30)) == \
                {0: expected_tokens((7, 8, 9), 4)}
        print(f"swap: {resp.replayed_requests} requests replayed, engine switch {resp.switch_s * 1000:.1f} ms, "
              f"RPC {took * 1000:.0f} ms")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pagedserve_admin_swap_executor_real_model(tmp_path):
    """The whole stack on the embedded SmolLM2 (CPU): `pagedserve admin swap-executor --pid` during 16
    greedy streams through the gateway; all 16 complete and their text equals the same requests'
    text after the swap (undisturbed), the old executor process is gone, a new one serves."""
    import asyncio
    import json
    import os

    import httpx

    from services.internal_auth import TOKEN_ENV
    from tests.integration.test_launcher import TOKEN, Launcher, alive

    launcher = Launcher(tmp_path / "serve.log", "--device", "cpu", "--max-model-len", "256",
                        "--num-gpu-blocks-override", "128", "--max-num-seqs", "16", "--shutdown-grace", "2")
    try:
        services = launcher.wait_ready()
        url, old_pid = services["gateway"][0], services["executor"][1]
        prompts = [f"Number {i}:" for i in range(STREAMS)]

        async def run_all(on_first=None) -> list[str]:
            firsts = 0

            async def one(c: httpx.AsyncClient, prompt: str) -> str:
                nonlocal firsts
                text, seen = [], False
                async with c.stream("POST", "/v1/completions", json={
                        "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True,
                        "ignore_eos": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text.append(chunk["choices"][0]["text"])
                        if not seen and "".join(text):
                            seen = True
                            firsts += 1
                            if firsts == STREAMS and on_first is not None:
                                on_first()
                return "".join(text)

            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                return await asyncio.gather(*(one(c, p) for p in prompts))

        def swap() -> None:
            r = subprocess.run([*PAGEDSERVE, "admin", "swap-executor", "--pid", str(launcher.proc.pid)],
                                             cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
                                             env={**os.environ, TOKEN_ENV: TOKEN})
            assert r.returncode == 0, r.stderr

        during = asyncio.run(run_all(on_first=swap))
        m = launcher.wait_for(r"executor swapped: .* (\d+) requests replayed", 60)
        after = asyncio.run(run_all())
        assert during == after
        assert all(len(t) > 3 for t in during)
        assert not alive(old_pid)
        print(f"swap during {STREAMS} streams: {m.group(0)}")
    finally:
        launcher.kill()
