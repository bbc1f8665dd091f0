"""The three services as real processes on 127.0.0.1 with the real SmolLM2 on CPU, driven through
services.client: same greedy tokens as the in-process engine, streaming text deltas, cancellation
freeing blocks, bad input while other streams run, a full queue, health/reflection, and an
executor killed mid-generation and restarted (launcher-style): the request completes with the
same tokens (replay)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine_core.sampling_params import SamplingParams
from services.client import AsyncPagedServeClient, PagedServeClient
from services.gen.pagedserve.v1 import common_pb2
from services.gen.pagedserve.v1 import scheduler_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)

MAX_MODEL_LEN = 512
NUM_BLOCKS = 128
EXECUTOR_ARGS = ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override",
                 str(NUM_BLOCKS), "--shutdown-grace", "1"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Water boils at",
    "My favourite colour is",
    "Translate to French: good morning ->",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
REPLAY_TOKENS = 16


class Stack:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.addrs: dict[str, str] = {}

    def spawn(self, name: str, module: str, *args: str) -> str:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        log = open(self.log_dir / f"{name}.log", "a")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", module, *args, "--grpc-reflection"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=log, text=True)
        line = proc.stdout.readline()
        assert "listening on" in line, (name, line, (self.log_dir / f"{name}.log").read_text()[-2000:])
        self.procs[name] = proc
        self.addrs[name] = line.rsplit(" ", 1)[-1].strip()
        return self.addrs[name]

    def spawn_executor(self, port: int | str = 0) -> str:
        return self.spawn("executor", "services.executor", *EXECUTOR_ARGS, "--port", str(port))

    def health(self, name: str, service: str = "") -> int | None:
        with grpc.insecure_channel(self.addrs[name]) as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=2).status
            except grpc.RpcError:
                return None

    def wait_health(self, name: str, want=health_pb2.HealthCheckResponse.SERVING, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.health(name)) != want:
            proc = self.procs[name]
            assert proc.poll() is None, (name, (self.log_dir / f"{name}.log").read_text()[-3000:])
            assert time.monotonic() < deadline, f"{name} health {status}, wanted {want}"
            time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack-logs"))
    try:
        ex = s.spawn_executor()
        s.spawn("tokenizer", "services.tokenizer", "--port", "0", "--max-model-len", str(MAX_MODEL_LEN))
        s.spawn("scheduler", "services.scheduler", "--executor-address", ex, "--port", "0", "--max-num-seqs", "4",
                "--max-queue-len", "8", "--executor-timeout", "90", "--shutdown-grace", "1")
        yield s  # health is awaited in `ready` (after the reference engine loaded, in parallel)
    finally:
        s.close()


@pytest.fixture(scope="module")
def reference(stack):
    """The in-process engine's greedy tokens (loaded while the services start). Synchronous
    scheduling here, async (the default) in the services: the tokens must not depend on it."""
    from engine_core.llm import LLM

    llm = LLM(max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=NUM_BLOCKS, device="cpu",
              async_scheduling=False)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    replay_prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three planets."}],
                                                      add_generation_prompt=True, tokenize=True)
    replay = llm.generate([replay_prompt], SamplingParams(temperature=0.0, max_tokens=REPLAY_TOKENS,
                                                          ignore_eos=True), use_tqdm=False)[0]
    llm.engine.shutdown()
    return {"prompts": prompts, "greedy": [o.outputs[0].token_ids for o in outs],
            "replay_prompt": replay_prompt, "replay": replay.outputs[0].token_ids}


@pytest.fixture(scope="module")
def ready(stack, reference):
    for name in ("executor", "tokenizer", "scheduler"):
        stack.wait_health(name)
    return stack


@pytest.fixture
def client(ready):
    with PagedServeClient(ready.addrs["scheduler"], ready.addrs["tokenizer"], timeout=120) as c:
        yield c


def wait_idle(client: PagedServeClient, timeout: float = 10) -> pb.SchedulerStats:
    deadline = time.monotonic() + timeout
    while True:
        st = client.stats(include_requests=True)
        if (st.num_running, st.num_waiting) == (0, 0) and st.kv_cache_usage == 0:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def test_greedy_tokens_equal_in_process_engine(ready, reference):
    """8 concurrent prompts through tokenizer + scheduler + executor == the in-process LLM."""
    async def run():
        async with AsyncPagedServeClient(ready.addrs["scheduler"], ready.addrs["tokenizer"], timeout=120) as c:
            prompts = await asyncio.gather(*(c.encode(p) for p in PROMPTS))
            assert prompts == reference["prompts"]
            return await asyncio.gather(*(c.generate(p, GREEDY) for p in PROMPTS))

    results = asyncio.run(run())
    assert [r.token_ids for r in results] == reference["greedy"]
    with PagedServeClient(ready.addrs["scheduler"], ready.addrs["tokenizer"]) as c:
        for r in results:
            assert r.finish_reason == "length" and r.usage.completion_tokens == 6
            assert r.text == c.decode(r.token_ids)
        wait_idle(c)


def test_streaming_yields_incremental_deltas(client):
    chunks = list(client.generate_stream("Write a short poem about the sea.", chat=True, temperature=0.0,
                                         max_tokens=10, ignore_eos=True))
    assert len(chunks) >= 5  # one per step (the first may carry several after a chunked prefill)
    assert sum(1 for c in chunks if c.text) >= 3
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    assert all(c.finish_reason is None for c in chunks[:-1])
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 10
    assert "".join(c.text for c in chunks) == client.decode(tokens)


def test_stop_string_finishes_the_request(client):
    r = client.generate("1, 2, 3, 4, 5, 6, 7,", temperature=0.0, max_tokens=30, stop=["10"], ignore_eos=True)
    assert r.finish_reason == "stop" and r.outputs[0].stop_reason == "10"
    assert "10" not in r.text and "9" in r.text
    st = wait_idle(client)
    assert st.finished_by_reason["stop"] >= 1


def test_cancelled_generate_frees_blocks(client):
    before = client.stats()
    stream = client.generate_stream("Tell me a very long story.", chat=True, temperature=0.0, max_tokens=300,
                                    ignore_eos=True)
    next(stream)
    next(stream)
    st = client.stats()
    assert st.num_running == 1 and st.kv_cache_usage > 0
    stream.close()  # cancels the Generate call
    st = wait_idle(client, timeout=5)
    assert st.finished_by_reason["abort"] == before.finished_by_reason["abort"] + 1
    assert all(b.ref_count == 0 for b in st.blocks)


def test_bad_input_fails_alone(client):
    stream = client.generate_stream([1, 504, 3060, 314], temperature=0.0, max_tokens=12, ignore_eos=True)
    first = next(stream)
    with pytest.raises(grpc.RpcError) as ei:
        list(client.generate_stream([5] * 600, max_tokens=4))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "600 tokens" in ei.value.details() and "max_model_len is 512" in ei.value.details()
    stub = client.scheduler
    for sp, match in [(common_pb2.SamplingParams(temperature=-1.0), "temperature"),
                      (common_pb2.SamplingParams(top_p=0.0), "top_p")]:
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Generate(pb.GenerateRequest(request_id="bad", prompt_token_ids=[1, 2], sampling_params=sp),
                               timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.Generate(pb.GenerateRequest(request_id="oov", prompt_token_ids=[1, 10**6]), timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in ei.value.details()
    rest = list(stream)
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 12
    assert rest[-1].finish_reason == "length"


def test_queue_full_is_resource_exhausted(client):
    """--max-num-seqs 4 --max-queue-len 8: 4 running + 8 waiting, the 13th is refused."""
    stub = client.scheduler
    calls = [stub.Generate(pb.GenerateRequest(request_id=f"q{i}", prompt_token_ids=[1, 504, 3060 + i],
                                              sampling_params=common_pb2.SamplingParams(max_tokens=400)),
                           timeout=60) for i in range(12)]
    try:
        deadline = time.monotonic() + 20
        while ((st := client.stats()).num_running, st.num_waiting) != (4, 8):
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as ei:
            list(stub.Generate(pb.GenerateRequest(request_id="over", prompt_token_ids=[1, 2]), timeout=10))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in ei.value.details()
    finally:
        for c in calls:
            c.cancel()
    wait_idle(client)


def test_health_and_reflection(ready):
    names = {"executor": "pagedserve.v1.Executor", "tokenizer": "pagedserve.v1.Tokenizer",
             "scheduler": "pagedserve.v1.Scheduler"}
    for name, service in names.items():
        for svc in ("", service):
            assert ready.health(name, svc) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(ready.addrs[name]) as ch:
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert {service, "grpc.health.v1.Health"} <= {s.name for s in resp.list_services_response.service}


def test_killed_executor_is_replayed_after_restart(ready, reference, client):
    """Runs last: kill -9 the executor mid-generation, start a new one on the same port (what the
    launcher does): the scheduler reports NOT_SERVING meanwhile, then replays the request, whose
    greedy tokens equal the uninterrupted in-process run."""
    before = client.stats()
    stream = client.generate_stream(reference["replay_prompt"], temperature=0.0, max_tokens=REPLAY_TOKENS,
                                    ignore_eos=True)
    chunks = [next(stream) for _ in range(3)]
    old = ready.procs["executor"]
    old.kill()
    old.wait()
    ready.wait_health("scheduler", want=health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    ready.spawn_executor(port=ready.addrs["executor"].rsplit(":", 1)[1])
    chunks += list(stream)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == reference["replay"]
    assert chunks[-1].finish_reason == "length"
    ready.wait_health("scheduler")
    st = wait_idle(client)
    assert st.executor_restarts == before.executor_restarts + 1 and st.executor_healthy
