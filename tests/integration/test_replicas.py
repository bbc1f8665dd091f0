"""Scale-out acceptance (issue 18) on CPU: two replicas (executor + scheduler processes each) of the
embedded SmolLM2 behind the gateway, one tokenizer service.

- prefix routing: 40 chat requests over 4 shared system prompts, sent in waves of one prompt: each
  wave lands on one replica and each prompt always on the same one (the gateway's per-replica
  `replica_requests_total`), new prompts go to both replicas, and the prefix-cache hit rate (the
  replicas' own counters) is >= 90 % of one replica's on the same kind of workload; round-robin
  spreads every prompt over both replicas and hits the cache less;
- one replica's executor and scheduler killed (SIGKILL) mid-load: no request without a token
  fails (those queued there move to the survivor), greedy requests that had tokens there resume on
  the survivor by replay and complete, sampled ones end with a clear in-band error, new requests
  succeed; restarted on its ports, the replica rejoins the rotation.
Requests are short (a few generated tokens) to keep the module around a minute or two.
"""
from __future__ import annotations

import concurrent.futures
import json
import random
import re
import signal
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.serve_bench.datasets import WORDS
from gateway.config import GatewayConfig
from services.gen.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.gateway_stack import InProcessStack, Proc, wait_until

pytestmark = pytest.mark.timeout(420)

MAX_LEN = 512
EXECUTOR_ARGS = ["--device", "cpu", "--max-model-len", str(MAX_LEN), "--num-gpu-blocks-override", "160",
                 "--shutdown-grace", "1"]
SCHEDULER_ARGS = ["--max-num-seqs", "2", "--max-model-len", str(MAX_LEN), "--executor-timeout", "60",
                  "--shutdown-grace", "1"]
ENV = {"OMP_NUM_THREADS": "1", "PROMETHEUS_MULTIPROC_DIR": None}
WAVES = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # one prompt per wave, 4 requests each: 40 requests


class Replica:
    def __init__(self, name: str, ex_port: int = 0, sc_port: int = 0) -> None:
        self.name = name
        self.executor = Proc(["-m", "services.executor", *EXECUTOR_ARGS, "--port", str(ex_port)], "executor", env=ENV)
        self.scheduler = Proc(["-m", "services.scheduler", *SCHEDULER_ARGS, "--port", str(sc_port),
                               "--executor-address", self.executor.address], "scheduler", env=ENV)

    @property
    def address(self) -> str:
        return self.scheduler.address

    def serving(self) -> bool:
        with grpc.insecure_channel(self.address) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    def stats(self) -> scheduler_pb2.SchedulerStats:
        with grpc.insecure_channel(self.address) as ch:
            return scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)

    def kill(self) -> None:
        for p in (self.scheduler, self.executor):
            p.stop(signal.SIGKILL)

    def stop(self) -> None:
        for p in (self.scheduler, self.executor):
            p.stop()


@pytest.fixture(scope="module")
def env():
    stack = InProcessStack()
    procs: list = []
    try:
        tok = Proc(["-m", "services.tokenizer", "--port", "0", "--max-model-len", str(MAX_LEN)], "tokenizer",
                   env=ENV)
        procs.append(tok)
        a = Replica("a")
        procs.append(a)
        b = Replica("b")
        procs.append(b)
        assert wait_until(lambda: a.serving() and b.serving(), timeout=180, interval=0.5), \
            (a.executor.output(), b.executor.output())

        def gateway(addresses: list[str], routing: str) -> httpx.Client:
            url = stack.start_gateway(GatewayConfig(scheduler_address=",".join(addresses), tokenizer_address=tok.address,
                                                    routing=routing, replica_stats_interval_s=0.1))
            return httpx.Client(base_url=url, timeout=120)

        yield {"a": a, "b": b, "tok": tok, "gateway": gateway, "procs": procs}
    finally:
        stack.close()
        for p in procs:
            p.stop()


def system_prompt(phase: str, k: int) -> str:
    rng = random.Random(f"{phase}-{k}")
    return f"You are assistant {k} of the {phase} team. " + " ".join(rng.choice(WORDS) for _ in range(110))


def chat(http: httpx.Client, system: str, user: str, max_tokens: int = 2, **extra) -> httpx.Response:
    return http.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens, "temperature": 0, **extra})


def routed(http: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(r'pagedserve:replica_requests_total\{(.*)\} (\S+)$', line)
        if m:
            replica = re.search(r'replica="([^"]+)"', m.group(1)).group(1)
            out[replica] = out.get(replica, 0.0) + float(m.group(2))
    return out


def run_waves(http: httpx.Client, phase: str) -> list[dict[str, float]]:
    """WAVES, each wave's 4 requests one after another; the per-replica routing deltas per wave."""
    deltas = []
    i = 0
    for k in WAVES:
        before = routed(http)
        for _ in range(4):
            i += 1
            r = chat(http, system_prompt(phase, k), f"Question {i}: what is {i} plus {i}?")
            assert r.status_code == 200, r.text
        after = routed(http)
        deltas.append({rep: after.get(rep, 0) - before.get(rep, 0) for rep in after
                       if after.get(rep, 0) != before.get(rep, 0)})
    return deltas


def hit_rate(replicas, before) -> float:
    now = [r.stats() for r in replicas]
    hits = sum(s.prefix_cache_hits - b.prefix_cache_hits for s, b in zip(now, before))
    queries = sum(s.prefix_cache_queries - b.prefix_cache_queries for s, b in zip(now, before))
    return hits / queries


def test_prefix_routing_keeps_prompts_on_one_replica(env):
    a, b = env["a"], env["b"]
    # one replica: the baseline hit rate
    single = env["gateway"]([a.address], "prefix")
    before = [a.stats()]
    run_waves(single, "single")
    single_rate = hit_rate([a], before)

    prefix = env["gateway"]([a.address, b.address], "prefix")
    before = [a.stats(), b.stats()]
    deltas = run_waves(prefix, "prefix")
    prefix_rate = hit_rate([a, b], before)
    home: dict[int, str] = {}
    for k, d in zip(WAVES, deltas):
        assert len(d) == 1 and list(d.values()) == [4.0], (k, d)  # the whole wave on one replica
        assert home.setdefault(k, next(iter(d))) == next(iter(d)), (k, home, d)  # always the same one
    assert set(home.values()) == {a.address, b.address}, home  # new prompts spread over both
    assert prefix_rate >= 0.9 * single_rate, (prefix_rate, single_rate)

    rr = env["gateway"]([a.address, b.address], "round-robin")
    before = [a.stats(), b.stats()]
    deltas = run_waves(rr, "rr")
    rr_rate = hit_rate([a, b], before)
    assert all(d == {a.address: 2.0, b.address: 2.0} for d in deltas), deltas  # every prompt on both
    assert rr_rate < prefix_rate, (rr_rate, prefix_rate)
    print(f"\nprefix-cache hit rate: one replica {single_rate:.3f}, two with prefix routing {prefix_rate:.3f}, "
          f"two with round-robin {rr_rate:.3f}")


def stream_chat(http: httpx.Client, system: str, user: str, max_tokens: int, greedy: bool, seed: int) -> dict:
    """{"content": [...], "error": dict | None, "finish": str | None, "greedy": bool} of one streamed
    chat request (greedy, or sampled with a seed)."""
    out: dict = {"content": [], "error": None, "finish": None, "greedy": greedy, "usage": None}
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            **({"temperature": 0} if greedy else {"temperature": 1.0, "seed": seed})}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                continue
            out["usage"] = chunk.get("usage") or out["usage"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    out["content"].append((time.monotonic(), c["delta"]["content"]))
                if c.get("finish_reason"):
                    out["finish"] = c["finish_reason"]
    return out


def test_killed_replica_fails_no_request_without_tokens_and_rejoins(env):
    a, b = env["a"], env["b"]
    http = env["gateway"]([a.address, b.address], "round-robin")
    b_before = b.stats()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futs = [pool.submit(stream_chat, http, system_prompt("kill", i), f"Count from {i} to {i + 30}.", 24,
                            i % 4 < 2, i)  # on each replica (round-robin) greedy and sampled requests
                for i in range(12)]  # 6 per replica: 2 running, 4 queued (--max-num-seqs 2)
        assert wait_until(lambda: (s := b.stats()).generation_tokens_total > b_before.generation_tokens_total
                          and s.num_waiting >= 1, timeout=120, interval=0.05)
        ex_port, sc_port = b.executor.port, b.scheduler.port
        b.kill()
        killed_at = time.monotonic()
        results = [f.result(timeout=240) for f in futs]
    errors = [r for r in results if r["error"] is not None]
    for r in results:
        if r["error"] is None:
            assert r["finish"] == "length" and r["usage"]["completion_tokens"] == 24, r
        else:  # only sampled requests that were already producing tokens on the killed replica
            assert not r["greedy"], r  # greedy ones resume on the survivor by replay
            assert r["content"] and r["content"][0][0] < killed_at, r
            assert r["error"]["code"] == "service_unavailable" and "produced tokens" in r["error"]["message"]
            assert b.address in r["error"]["message"]
    assert len(errors) <= 2  # at most the killed replica's running requests
    assert all(r["error"] is None for r in results if r["greedy"])
    moved = http.get("/metrics").text
    assert re.search(rf'pagedserve:replica_retries_total\{{replica="{re.escape(b.address)}"\}} [1-9]', moved), \
        "the requests queued on the killed replica moved"
    # new requests: all on the survivor
    for i in range(3):
        assert chat(http, system_prompt("after", i), "Hi").status_code == 200
    # restarted on its ports, it rejoins
    b2 = Replica("b", ex_port, sc_port)
    env["procs"].append(b2)
    assert b2.address == b.address
    assert wait_until(b2.serving, timeout=180, interval=0.5), b2.executor.output()
    assert wait_until(lambda: re.search(rf'pagedserve:replica_healthy\{{replica="{re.escape(b.address)}"\}} 1',
                                        http.get("/metrics").text), timeout=30, interval=0.2)
    before = routed(http).get(b.address, 0)
    for i in range(4):
        assert chat(http, system_prompt("rejoin", i), "Hello").status_code == 200
    assert routed(http).get(b.address, 0) - before == 2  # round-robin: half of them
    print(f"\nkilled replica: {len(errors)} sampled in-flight request(s) with tokens ended with an in-band error, "
          f"{len(results) - len(errors)} of {len(results)} completed")
