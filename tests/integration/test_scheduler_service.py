"""The scheduler gRPC service on the deterministic FakeExecutor (fast: no model): n>1 fan-out,
validation errors, cancellation freeing blocks, queue limits, Abort / stop strings, stats and the
block map, replay after executor failures, a dead remote executor, health, reflection, SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine_core.config import EngineConfig
from engine_core.executor.base import ExecutorError
from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2_grpc
from services.gen.pagedserve.v1 import scheduler_pb2 as pb
from services.scheduler.server import SERVICE_NAME, GuardedExecutor, SchedulerService
from tests.integration.fake_executor import BOOM_TOKEN, FakeExecutor
from tests.integration.loop_thread import LoopThread

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)
STEP_S = 0.01  # fake step time: streams stay in flight long enough to cancel


class Scheduler:
    """An in-process scheduler service (own event loop thread) on a local executor."""

    def __init__(self, make_executor=None, *, max_queue_len: int = 0, executor_timeout_s: float = 5.0,
                 **engine_kw) -> None:
        # The fake executor says "cpu" but computes nothing: keep the GPU-sized step budget these tests
        # were written for (e.g. 32 streams admitted in one step), not the CPU's 64-token default.
        engine_kw = {"max_model_len": 512, "num_gpu_blocks_override": 64, "max_num_batched_tokens": 2048, **engine_kw}
        self.executors: list[FakeExecutor] = []

        def factory(config):
            ex = (make_executor or (lambda c: FakeExecutor(c, step_delay_s=STEP_S)))(config)
            self.executors.append(ex)
            return GuardedExecutor(ex)

        self.lt = LoopThread()

        async def start():
            svc = SchedulerService(EngineConfig(**engine_kw), factory, port=0, max_queue_len=max_queue_len,
                                   executor_timeout_s=executor_timeout_s, grace_s=0.2)
            await svc.start()
            return svc

        self.svc = self.lt.run(start())
        self.channel = grpc.insecure_channel(self.svc.address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        wait_serving(self.channel)

    def stats(self, include_requests: bool = False) -> pb.SchedulerStats:
        return self.stub.GetStats(pb.GetStatsRequest(include_requests=include_requests), timeout=5)

    def close(self) -> None:
        self.channel.close()
        self.lt.run(self.svc.stop(0.2))
        self.lt.close()


def wait_serving(channel, service: str = "", timeout: float = 20.0, want=health_pb2.HealthCheckResponse.SERVING):
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            status = None
        if status == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"health stayed {status}, wanted {want}")
        time.sleep(0.05)


def gen_req(rid: str, prompt=(1, 2, 3), **sp) -> pb.GenerateRequest:
    sp.setdefault("max_tokens", 8)
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=list(prompt),
                              sampling_params=common_pb2.SamplingParams(**sp))


def expected_tokens(prompt, n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(FakeExecutor.next_token(toks[-1], len(toks)))
    return toks[len(prompt):]


def collect(call) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for msg in call:
        out.setdefault(msg.index, []).extend(msg.token_ids)
    return out


@pytest.fixture
def sched():
    s = Scheduler(max_queue_len=64)
    yield s
    s.close()


def test_generate_n_samples_usage_and_metrics(sched):
    msgs = list(sched.stub.Generate(gen_req("a", [5, 6, 7], max_tokens=6, n=3, logprobs=1), timeout=10))
    finals = [m for m in msgs if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert sorted(m.index for m in finals) == [0, 1, 2]
    for m in finals:
        assert m.finish_reason == pb.FINISH_REASON_LENGTH
        assert (m.usage.prompt_tokens, m.usage.completion_tokens) == (3, 6)
        assert m.metrics.e2e_latency_s >= m.metrics.time_to_first_token_s > 0
    toks: dict[int, list[int]] = {}
    for m in msgs:
        toks.setdefault(m.index, []).extend(m.token_ids)
        assert len(m.logprobs) == len(m.token_ids)
    assert toks == {i: expected_tokens([5, 6, 7], 6) for i in range(3)}  # the fake ignores seeds
    st = sched.stats()
    assert st.finished_by_reason["length"] == 3 and st.num_running == 0 and st.kv_cache_usage == 0
    assert st.generation_tokens_total == 18 and st.executor_healthy


def test_validation_errors_keep_serving(sched):
    long_call = sched.stub.Generate(gen_req("long", max_tokens=40), timeout=20)
    first = next(long_call)
    assert first.token_ids
    bad = [
        (gen_req("", [1]), "request_id is required"),
        (gen_req("e", []), "prompt is empty"),
        (gen_req("p", top_p=5.0), "top_p"),
        (gen_req("t", [1, 5000]), "outside the vocabulary"),
        (gen_req("len", [1] * 600), "prompt has 600 tokens, but max_model_len is 512"),
        (gen_req("long"), "already in flight"),
        (gen_req("lb", logit_bias={5000: 1.0}), "logit_bias"),
        (gen_req("lp", logprobs=21), "logprobs"),
    ]
    for req, match in bad:
        with pytest.raises(grpc.RpcError) as ei:
            list(sched.stub.Generate(req, timeout=5))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, ei.value.details())
        assert match in ei.value.details()
    rest = collect(long_call)
    assert list(first.token_ids) + rest[0] == expected_tokens([1, 2, 3], 40)
    assert sched.stats().num_running == 0


def test_kv_cache_too_small_for_prompt():
    s = Scheduler(num_gpu_blocks_override=8, max_model_len=512)  # 7 usable blocks = 112 tokens
    try:
        with pytest.raises(grpc.RpcError) as ei:
            list(s.stub.Generate(gen_req("big", [1] * 200), timeout=5))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "200 tokens needs 13 KV blocks" in ei.value.details()
    finally:
        s.close()


def test_cancel_frees_blocks(sched):
    """32 concurrent streams; cancelling 16 mid-stream leaves zero blocks once the others finish."""
    calls = {f"r{i}": sched.stub.Generate(gen_req(f"r{i}", [i + 1] * (5 + i), max_tokens=30), timeout=30)
             for i in range(32)}
    for call in calls.values():
        next(call)  # every stream is running
    st = sched.stats()
    assert st.num_running + st.num_waiting == 32 and st.kv_cache_usage > 0
    for i in range(0, 32, 2):
        calls[f"r{i}"].cancel()
    for i in range(1, 32, 2):
        msgs = list(calls[f"r{i}"])
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    deadline = time.monotonic() + 5
    while (st := sched.stats(include_requests=True)).num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st.num_running == 0 and st.num_waiting == 0
    assert st.kv_cache_usage == 0.0 and st.num_free_blocks == st.num_kv_blocks
    assert all(b.ref_count == 0 for b in st.blocks) and not st.requests
    assert st.finished_by_reason["abort"] == 16 and st.finished_by_reason["length"] == 16


def test_cancel_frees_blocks_within_a_step(sched):
    call = sched.stub.Generate(gen_req("c", max_tokens=400), timeout=30)
    next(call)
    before = sched.stats(include_requests=True)
    assert [r.request_id for r in before.requests] == ["c"] and before.kv_cache_usage > 0
    call.cancel()
    deadline = time.monotonic() + 5
    while (st := sched.stats()).kv_cache_usage > 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert st.kv_cache_usage == 0 and st.num_running == 0
    assert st.num_steps - before.num_steps <= 3  # ~one step (plus stats-polling jitter)


def test_queue_full_is_resource_exhausted():
    s = Scheduler(max_queue_len=3, max_num_seqs=2)
    try:
        calls = [s.stub.Generate(gen_req(f"q{i}", max_tokens=200), timeout=30) for i in range(5)]
        deadline = time.monotonic() + 5
        while ((st := s.stats()).num_running, st.num_waiting) != (2, 3):
            assert time.monotonic() < deadline, st
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as ei:
            list(s.stub.Generate(gen_req("over"), timeout=5))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full (3 requests)" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:  # n counts: 2 samples do not fit either
            list(s.stub.Generate(gen_req("n2", n=2), timeout=5))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.stats().num_requests_rejected == 2
        for c in calls:
            c.cancel()
        deadline = time.monotonic() + 5
        while s.stats().num_waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert collect(s.stub.Generate(gen_req("after", max_tokens=3), timeout=5)) == {
            0: expected_tokens([1, 2, 3], 3)}
    finally:
        s.close()


def test_abort_rpc_and_stop_strings(sched):
    # A stop string found by the gateway: finish as STOP with stop_str (not ABORT).
    call = sched.stub.Generate(gen_req("s", max_tokens=300), timeout=20)
    next(call)
    resp = sched.stub.Abort(pb.AbortRequest(request_ids=["s", "nope"], stop_str="</end>"), timeout=5)
    assert list(resp.aborted_request_ids) == ["s"] and list(resp.unknown_request_ids) == ["nope"]
    last = list(call)[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.stop_str == "</end>"
    assert last.usage.completion_tokens >= 1
    # n=2: stop only sample 1; sample 0 runs to its length.
    call = sched.stub.Generate(gen_req("two", n=2, max_tokens=60), timeout=20)
    next(call)
    sched.stub.Abort(pb.AbortRequest(request_ids=["two"], stop_str="x", indices=[1]), timeout=5)
    finals = {m.index: m for m in call if m.finish_reason}
    assert finals[1].finish_reason == pb.FINISH_REASON_STOP and finals[1].stop_str == "x"
    assert finals[0].finish_reason == pb.FINISH_REASON_LENGTH and finals[0].usage.completion_tokens == 60
    # Plain abort; indices out of range is the caller's mistake.
    call = sched.stub.Generate(gen_req("ab", max_tokens=300), timeout=20)
    next(call)
    with pytest.raises(grpc.RpcError) as ei:
        sched.stub.Abort(pb.AbortRequest(request_ids=["ab"], indices=[3]), timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    sched.stub.Abort(pb.AbortRequest(request_ids=["ab"]), timeout=5)
    assert list(call)[-1].finish_reason == pb.FINISH_REASON_ABORT
    st = sched.stats()
    assert st.finished_by_reason["stop"] == 2 and st.finished_by_reason["abort"] == 1
    assert st.kv_cache_usage == 0


def test_stats_block_map_and_watch(sched):
    call = sched.stub.Generate(gen_req("m", [7] * 40, max_tokens=300), timeout=20)
    next(call)
    st = sched.stats(include_requests=True)
    (req,) = st.requests
    assert (req.request_id, req.status, req.num_prompt_tokens) == ("m", "running", 40)
    assert len(req.block_ids) == 3  # 40 prompt tokens + outputs, 16 per block
    held = {b.block_id: b for b in st.blocks if b.ref_count}
    assert set(held) == set(req.block_ids) and all(list(b.request_ids) == ["m"] for b in held.values())
    assert any(b.cached for b in held.values())  # the two full prompt blocks
    assert st.num_kv_blocks == 63 and st.num_tokens_in_used_blocks > 40
    watch = sched.stub.WatchStats(pb.WatchStatsRequest(interval_s=0.05), timeout=10)
    snaps = [next(watch) for _ in range(3)]
    watch.cancel()
    assert snaps[0].num_steps < snaps[-1].num_steps and snaps[-1].generation_throughput_tps > 0
    assert not snaps[0].requests  # include_requests not set
    call.cancel()
    info = sched.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.executor.model_name == "fake" and info.executor.num_kv_blocks == 64
    assert info.enable_prefix_caching and info.max_num_seqs == 256


class FlakyExecutor(FakeExecutor):
    """Fails the given step ids once (an ExecutorError: the device / stream broke)."""

    def __init__(self, config, fail_steps=(4,)) -> None:
        super().__init__(config, step_delay_s=STEP_S)
        self.fail_steps = set(fail_steps)
        self.new_reqs: list[tuple[str, int, int]] = []  # (id, num_computed_tokens, num output tokens)

    def execute(self, so):
        self.new_reqs += [(r.req_id, r.num_computed_tokens, len(r.output_token_ids)) for r in so.scheduled_new_reqs]
        if so.step_id in self.fail_steps:
            self.fail_steps.discard(so.step_id)
            raise ExecutorError(f"simulated failure at step {so.step_id}")
        return super().execute(so)


def test_executor_failure_is_replayed_and_poison_fails():
    s = Scheduler(lambda c: FlakyExecutor(c))
    try:
        prompt = list(range(3, 23))  # 20 tokens: one full, prefix-cached block
        assert collect(s.stub.Generate(gen_req("r", prompt, max_tokens=10), timeout=10)) == {
            0: expected_tokens(prompt, 10)}
        st = s.stats()
        assert st.executor_restarts == 1 and st.finished_by_reason["length"] == 1
        # The replay is a full re-prefill: the prefix cache was dropped with the executor's state
        # (a restarted executor's KV cache is empty).
        assert s.executors[0].new_reqs == [("r", 0, 0), ("r", 0, 4)]  # steps 0-3 sampled 4 tokens
        # A request that kills every step it is in: replayed a few times, then failed in-band.
        msgs = list(s.stub.Generate(gen_req("boom", [BOOM_TOKEN, 1]), timeout=10))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_ERROR
        assert "failed 3 steps in a row" in msgs[-1].error_message
        assert "simulated device failure" in msgs[-1].error_message
        assert s.stats().kv_cache_usage == 0
        assert collect(s.stub.Generate(gen_req("ok", max_tokens=2), timeout=10)) == {
            0: expected_tokens([1, 2, 3], 2)}
    finally:
        s.close()


# ---------------------------------------------------------------------------- processes
def spawn(module: str, *args: str, env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.rsplit(" ", 1)[-1].strip()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


FAKE_EXECUTOR = ("--executor", "tests.integration.fake_executor:slow_fake_executor",
                 "--num-gpu-blocks-override", "64", "--max-model-len", "512")


def test_remote_executor_death_restart_and_timeout():
    """A killed executor: NOT_SERVING; the in-flight request is replayed if the executor is back in
    time (same tokens), else fails with UNAVAILABLE and a clear message; SERVING again after."""
    env = {"FAKE_EXECUTOR_STEP_DELAY_S": "0.02"}
    ex, ex_addr = spawn("services.executor", *FAKE_EXECUTOR, "--port", "0", env_extra=env)
    port = ex_addr.rsplit(":", 1)[1]
    sch, addr = spawn("services.scheduler", "--grpc-reflection", "--executor-address", ex_addr,
                      "--executor-timeout", "3", "--port", "0", "--shutdown-grace", "1")
    ch = grpc.insecure_channel(addr)
    stub = scheduler_pb2_grpc.SchedulerStub(ch)
    try:
        wait_serving(ch)
        # 1) Killed and restarted within the timeout: the request completes with the same tokens.
        call = stub.Generate(gen_req("replay", [9, 8, 7], max_tokens=60), timeout=30)
        got = list(next(call).token_ids)
        ex.kill()
        ex.wait()
        wait_serving(ch, want=health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
        ex, _ = spawn("services.executor", *FAKE_EXECUTOR, "--port", port, env_extra=env)
        for msg in call:
            got += msg.token_ids
        assert got == expected_tokens([9, 8, 7], 60) and msg.finish_reason == pb.FINISH_REASON_LENGTH
        wait_serving(ch)
        assert stub.GetStats(pb.GetStatsRequest(), timeout=5).executor_restarts >= 1
        # 2) Killed for good: UNAVAILABLE with a clear message after --executor-timeout, no hang.
        call = stub.Generate(gen_req("lost", max_tokens=300), timeout=30)
        next(call)
        ex.kill()
        ex.wait()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            list(call)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unavailable for more than 3s" in ei.value.details() and ex_addr in ei.value.details()
        assert 2.5 < time.monotonic() - t0 < 8
        with pytest.raises(grpc.RpcError) as ei:  # new requests fail fast while it stays down
            list(stub.Generate(gen_req("new"), timeout=5))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        st = stub.GetStats(pb.GetStatsRequest(), timeout=5)
        assert not st.executor_healthy and st.kv_cache_usage == 0 and st.finished_by_reason["error"] == 1
        # 3) Back: serving again.
        ex, _ = spawn("services.executor", *FAKE_EXECUTOR, "--port", port, env_extra=env)
        wait_serving(ch)
        assert collect(stub.Generate(gen_req("back", max_tokens=3), timeout=10)) == {0: expected_tokens([1, 2, 3], 3)}
        # Health (overall + service name) and reflection.
        wait_serving(ch, SERVICE_NAME)
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5))
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= {s.name for s in resp.list_services_response.service}
        # 4) SIGTERM with a stream in flight: graceful, prompt exit 0.
        call = stub.Generate(gen_req("inflight", max_tokens=1000), timeout=30)
        next(call)
        t0 = time.monotonic()
        sch.send_signal(signal.SIGTERM)
        assert sch.wait(10) == 0 and time.monotonic() - t0 < 5
        with pytest.raises(grpc.RpcError):
            list(call)
    finally:
        ch.close()
        stop(sch)
        stop(ex)


def test_scheduler_waits_for_a_late_executor():
    """Started before its executor: NOT_SERVING, requests wait, then run once it is up."""
    env = {"FAKE_EXECUTOR_STEP_DELAY_S": "0.0"}
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    sch, addr = spawn("services.scheduler", "--executor-address", f"127.0.0.1:{port}", "--port", "0")
    ex = None
    ch = grpc.insecure_channel(addr)
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        wait_serving(ch, want=health_pb2.HealthCheckResponse.NOT_SERVING)
        call = stub.Generate(gen_req("early", max_tokens=4), timeout=20)
        time.sleep(0.3)
        ex, _ = spawn("services.executor", *FAKE_EXECUTOR, "--port", str(port), env_extra=env)
        assert collect(call) == {0: expected_tokens([1, 2, 3], 4)}
        wait_serving(ch)
    finally:
        ch.close()
        stop(sch)
        if ex is not None:
            stop(ex)


# ---------------------------------------------------------------------------- GenerateStream
class StreamClient:
    """One GenerateStream: requests go in through a queue, responses are read on demand."""

    def __init__(self, stub) -> None:
        import queue

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.call = stub.GenerateStream(iter(self._q.get, None), timeout=30)
        self.messages: list[pb.GenerateStreamResponse] = []

    def send(self, adds=(), aborts=()) -> None:
        self._q.put(pb.GenerateStreamRequest(add=list(adds), abort=list(aborts)))

    def until(self, done) -> dict:
        """Read messages until done(state); state: {key: {"tokens": {index: [...]}, "final": {index: msg},
        "accepted": bool, "error": StreamStatus}}."""
        state: dict = getattr(self, "_state", {})
        self._state = state
        while not done(state):
            msg = next(self.call)
            self.messages.append(msg)
            for k in msg.accepted:
                state.setdefault(k, {"tokens": {}, "final": {}})["accepted"] = True
            for st in msg.errors:
                state.setdefault(st.key, {"tokens": {}, "final": {}})["error"] = st
            pos = 0
            for k, i, n in zip(msg.keys, msg.indices, msg.num_tokens):
                state[k]["tokens"].setdefault(i, []).extend(msg.token_ids[pos:pos + n])
                pos += n
            for o in msg.outputs:
                s = state[o.key]
                s["tokens"].setdefault(o.response.index, []).extend(o.response.token_ids)
                if o.response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    s["final"][o.response.index] = o.response
        return state

    def close(self) -> None:
        self._q.put(None)
        self.call.cancel()


def test_generate_stream_multiplexes_with_in_band_errors(sched):
    """Many requests on one stream: one message per step for all of them; rejections and aborts
    are per request and in-band, the other requests carry on; closing the stream frees the rest."""
    s = StreamClient(sched.stub)
    try:
        s.send(adds=[pb.StreamAdd(key=1, request=gen_req("s1", [1, 2, 3], max_tokens=12)),
                     pb.StreamAdd(key=2, request=gen_req("s2", [4, 5], max_tokens=10, n=2)),
                     pb.StreamAdd(key=3, request=gen_req("s3", [])),  # empty prompt
                     pb.StreamAdd(key=4, request=gen_req("s1")),  # request_id in flight
                     pb.StreamAdd(key=5, request=gen_req("s5", [1, 5000])),  # outside the vocabulary
                     pb.StreamAdd(key=6, request=gen_req("s6", max_tokens=200))])
        st = s.until(lambda st: all(k in st for k in (1, 2, 3, 4, 5, 6)) and st[6]["tokens"])
        assert {k: st[k]["error"].message for k in (3, 4, 5)} == {
            3: "prompt is empty: at least one token is required",
            4: "request_id 's1' is already in flight",
            5: st[5]["error"].message}
        assert "outside the vocabulary" in st[5]["error"].message
        assert all(st[k]["error"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for k in (3, 4, 5))
        assert all(st[k].get("accepted") for k in (1, 2, 6))
        s.send(aborts=[pb.StreamAbort(key=6, stop_str="xyz")])  # a stop string found by the caller
        st = s.until(lambda st: len(st[1]["final"]) == 1 and len(st[2]["final"]) == 2 and 6 in st and st[6]["final"])
        assert st[1]["tokens"][0] == expected_tokens([1, 2, 3], 12)
        assert st[2]["tokens"] == {0: expected_tokens([4, 5], 10), 1: expected_tokens([4, 5], 10)}
        assert st[1]["final"][0].finish_reason == pb.FINISH_REASON_LENGTH
        assert st[1]["final"][0].usage.completion_tokens == 12
        assert st[6]["final"][0].finish_reason == pb.FINISH_REASON_STOP and st[6]["final"][0].stop_str == "xyz"
        # Per-step batching, not per token: at most one message per engine step (fewer when coalesced).
        steps_msgs = sum(1 for m in s.messages if m.keys or m.outputs)
        assert steps_msgs <= sched.stats().num_steps + 1
        # A long request left on the stream is aborted (its blocks freed) when the stream ends.
        s.send(adds=[pb.StreamAdd(key=7, request=gen_req("s7", max_tokens=400))])
        s.until(lambda st: 7 in st and st[7]["tokens"])
        assert sched.stats().num_running == 1
    finally:
        s.close()
    deadline = time.monotonic() + 5
    while sched.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    st = sched.stats()
    assert st.num_running == 0 and st.kv_cache_usage == 0


# ---------------------------------------------------------------------------- sequence groups
def test_best_of_and_beam_search_through_the_service(sched):
    """n>1 / best_of / beam search run on forked block tables in the scheduler (the fake executor
    computes nothing, so only the shape is checked here; tokens vs HF and vs in-process: the
    real-model unit and gateway tests)."""
    msgs = list(sched.stub.Generate(gen_req("bo", [5, 6, 7, 8], max_tokens=5, n=2, best_of=4), timeout=10))
    finals = [m for m in msgs if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert sorted(m.index for m in finals) == [0, 1]
    assert all(not m.logprobs for m in msgs)  # ranked on logprobs, which were not asked for
    assert collect(iter(msgs)) == {i: expected_tokens([5, 6, 7, 8], 5) for i in range(2)}
    msgs = list(sched.stub.Generate(gen_req("bs", [5, 6, 7, 8], max_tokens=4, n=3, use_beam_search=True,
                                            length_penalty=0.5), timeout=10))
    finals = [m for m in msgs if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert sorted(m.index for m in finals) == [0, 1, 2]
    assert all(1 <= m.usage.completion_tokens <= 4 for m in finals)  # the fake has EOS among its top tokens
    st = sched.stats()
    assert st.kv_cache_usage == 0 and st.num_running == 0 and st.num_waiting == 0


def test_bad_group_params_are_invalid_argument(sched):
    for sp, field in (({"n": 3, "best_of": 2}, "best_of"), ({"n": 11, "use_beam_search": True}, "beam_width")):
        with pytest.raises(grpc.RpcError) as e:
            list(sched.stub.Generate(gen_req("bad", **sp), timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    assert sched.stats().kv_cache_usage == 0


def test_cancel_beam_search_and_best_of_frees_blocks(sched):
    # ignore_eos: the fake executor has EOS among its top tokens, so without it a search could end
    # on its own before the first stats poll and there would be nothing left to cancel (flaky).
    for sp in ({"n": 4, "use_beam_search": True, "ignore_eos": True}, {"n": 2, "best_of": 3, "ignore_eos": True}):
        call = sched.stub.Generate(gen_req("c", list(range(1, 40)), max_tokens=400, **sp), timeout=20)
        deadline = time.monotonic() + 5
        while sched.stats().kv_cache_usage == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.stats().kv_cache_usage > 0
        call.cancel()
        deadline = time.monotonic() + 5
        while sched.stats().kv_cache_usage > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        st = sched.stats()
        assert st.kv_cache_usage == 0 and st.num_running == 0 and st.num_waiting == 0
