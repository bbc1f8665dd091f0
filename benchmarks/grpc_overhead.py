"""What the gRPC split costs (issue 4 benchmark): the same workload in-process vs through the services.

    .venv/bin/python benchmarks/grpc_overhead.py [--device cpu] [--threads 1] [--input-len 32]
        [--output-len 32] [--num-prompts 64] [--c1-prompts 4] [--concurrency 1,64] [--repeats 2]

Three parts, one run:

1. Model run (the embedded SmolLM2, greedy, ignore_eos so every request makes exactly
   --output-len tokens). The in-process peer is an `EngineCore` with a `LocalExecutor`, driven by a
   closed loop in this process (token ids in, token ids out: no tokenizer, as the scheduler service
   takes token ids). The split is `python -m services.executor` (the model) +
   `python -m services.scheduler --executor-address <it>` (scheduler + block manager, driving the
   executor through `GrpcExecutor`), driven through the scheduler's streaming `Generate` RPC with
   grpc.aio (the same closed loop: at most C calls in flight). Both are loaded side by side and
   the runs alternate (order flipped every repeat) so drifting load on a shared machine hits both
   alike. Same engine flags, same prompts (fresh random token ids per concurrency level and
   repeat, so the prefix cache never hits), same intra-op
   thread count in both (--threads, via OMP_NUM_THREADS for the executor process). Reported per
   concurrency: output tok/s of each and their ratio, TTFT p50 of each and the difference
   (TTFT: request sent -> first token received), and whether the greedy tokens agree.
2. Bytes per decode step at 64 and 256 running requests: the real `Scheduler` (in an
   `EngineCore`) drives a model-free executor; every pure decode step (no new request, one
   token each) is converted with services/convert.py and its StepBatch / StepResult
   `ByteSize()` recorded (request ids like the gateway's, `cmpl-<32 hex>`; sampled ids in the
   SmolLM2 range). No model needed.
3. Per-step round trip of the executor hop, model-free: the same scheduler steps with the
   model-free executor in-process vs behind `python -m services.executor` through
   `GrpcExecutor(track_bytes=True)` (whose byte counters cross-check part 2). Since the fake
   step costs ~nothing, the difference is the transport cost per step that a real step (GPU: a
   few ms) would pay on top.

Writes benchmarks/results/grpc_overhead_<device>_<date>.json and .png (meta: date, device,
command, load average before/after: the numbers move with other load on the machine).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import ServerProcess

RESULTS = ROOT / "benchmarks" / "results"
LISTENING = re.compile(r"listening on (\S+)")
FAKE_EXECUTOR = "tests.integration.fake_executor:FakeExecutor"
FAKE_BLOCKS = 4096  # 256 requests x (32 + 32) tokens / 16 = 1024 blocks, with room to spare
TARGET_THROUGHPUT_LOSS = 0.05
TARGET_TTFT_MS = 3.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_prompts(n: int, length: int, seed: int, lo: int = 1000, hi: int = 40000) -> list[list[int]]:
    """Random ordinary SmolLM2 token ids (no special tokens); a distinct seed per phase."""
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def summarize(name: str, concurrency: int, ttfts: list[float], ends: list[float], ntoks: list[int],
              t_start: float, tokens: list[list[int]]) -> dict:
    elapsed = max(ends) - t_start
    n_out = sum(ntoks)
    return {"path": name, "concurrency": concurrency, "requests": len(ntoks), "output_tokens": n_out,
            "elapsed_s": elapsed, "output_tok_s": n_out / elapsed,
            "ttft_p50_ms": 1e3 * pct(ttfts, 0.5), "ttft_p90_ms": 1e3 * pct(ttfts, 0.9),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttfts), "ttft_min_ms": 1e3 * min(ttfts),
            "ttft_max_ms": 1e3 * max(ttfts), "ttfts_ms": [round(1e3 * t, 2) for t in ttfts], "tokens": tokens}


# ================================================================ part 1: in-process
@dataclass
class RequestTrace:
    """One request of a closed loop (time.perf_counter() seconds)."""

    sent: float
    first: float | None = None  # first token
    end: float | None = None
    token_ids: list[int] = field(default_factory=list)


def closed_loop(core, prompts: list[list[int]], params, concurrency: int, tag: str,
                on_step=None) -> list[RequestTrace]:
    """Drive an EngineCore as a closed loop: keep `concurrency` requests in it, replace a finished
    one at once. `params`: one SamplingParams, or one per prompt. `on_step(seconds)` sees each
    step's duration. Returns one trace per prompt, in prompt order."""
    pending = collections.deque(enumerate(prompts))
    traces: dict[str, RequestTrace] = {}
    order = [f"ip-{tag}-{i}" for i in range(len(prompts))]
    inflight: set[str] = set()

    def admit() -> None:
        while pending and len(inflight) < concurrency:
            i, p = pending.popleft()
            rid = order[i]
            traces[rid] = RequestTrace(sent=time.perf_counter())
            core.add_request(rid, p, params[i] if isinstance(params, list) else params)
            inflight.add(rid)

    admit()
    while inflight:
        t0 = time.perf_counter()
        deltas = core.step()
        now = time.perf_counter()
        if on_step is not None:
            on_step(now - t0)
        for d in deltas:
            t = traces[d.request_id]
            if d.new_token_ids:
                if t.first is None:
                    t.first = now
                t.token_ids.extend(d.new_token_ids)
            if d.finished:
                t.end = now
                inflight.discard(d.request_id)
        admit()
    return [traces[r] for r in order]


def run_inprocess(core, prompts: list[list[int]], params, concurrency: int, tag: str) -> dict:
    steps0 = core.counters.num_steps
    t_start = time.perf_counter()
    traces = closed_loop(core, prompts, params, concurrency, tag)
    res = summarize("in-process", concurrency, [t.first - t.sent for t in traces], [t.end for t in traces],
                    [len(t.token_ids) for t in traces], t_start, [t.token_ids for t in traces])
    res["engine_steps"] = core.counters.num_steps - steps0
    return res


# ================================================================ part 1: services
def spawn(name: str, module: str, argv: list[str], threads: int, log_dir: Path) -> tuple[ServerProcess, str]:
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = ServerProcess(name, [sys.executable, "-m", module, *argv], LISTENING, env=env,
                         log_path=log_dir / f"{name}.log")
    url = proc.wait_ready(timeout=180)
    return proc, url.removeprefix("http://")


def wait_serving(addr: str, timeout: float = 180.0, proc: ServerProcess | None = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{addr} not SERVING after {timeout:.0f}s")
            time.sleep(0.1)


async def run_service(addr: str, prompts: list[list[int]], params, concurrency: int, tag: str) -> dict:
    import grpc

    from services import convert
    from services.gen.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
    from services.grpc_server import channel_options

    sp = convert.sampling_params_to_proto(params)
    async with grpc.aio.insecure_channel(addr, options=channel_options()) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        steps0 = (await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)).num_steps
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, p: list[int]):
            async with sem:
                t0 = time.perf_counter()
                first, toks = None, []
                req = scheduler_pb2.GenerateRequest(request_id=f"svc-{tag}-{i}", prompt_token_ids=p,
                                                    sampling_params=sp)
                async for msg in stub.Generate(req, timeout=600):
                    if msg.token_ids:
                        if first is None:
                            first = time.perf_counter() - t0
                        toks.extend(msg.token_ids)
                    if msg.finish_reason not in (scheduler_pb2.FINISH_REASON_UNSPECIFIED,
                                                 scheduler_pb2.FINISH_REASON_LENGTH):
                        raise RuntimeError(f"request {i} finished with {msg.finish_reason}: {msg.error_message}")
                return first, time.perf_counter(), toks

        t_start = time.perf_counter()
        res = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        steps1 = (await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)).num_steps
    out = summarize("services", concurrency, [r[0] for r in res], [r[1] for r in res],
                    [len(r[2]) for r in res], t_start, [r[2] for r in res])
    out["engine_steps"] = steps1 - steps0
    return out


def _show(r: dict, rep: int) -> None:
    print(f"  {r['path']:10s} c={r['concurrency']:<3d} rep {rep}: {r['output_tok_s']:6.1f} tok/s, TTFT p50 "
          f"{r['ttft_p50_ms']:7.1f} ms (min {r['ttft_min_ms']:.0f}, max {r['ttft_max_ms']:.0f}), "
          f"{r['engine_steps']} engine steps", flush=True)


def model_phase(args, log_dir: Path) -> tuple[list[dict], list[dict]]:
    """Both paths loaded side by side (each idle while the other runs); per concurrency level the
    runs alternate in-process / services (order flipped every repeat) so drifting background load
    on a shared machine hits both alike. Fresh prompts per (level, repeat), the same for both."""
    from engine_core.config import EngineConfig
    from engine_core.engine_core import EngineCore
    from engine_core.executor.local import LocalExecutor
    from engine_core.sampling_params import SamplingParams

    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    procs: list[ServerProcess] = []
    core = None
    inproc, svc = [], []
    try:
        t0 = time.perf_counter()
        ex, ex_addr = spawn("executor", "services.executor",
                            ["--device", args.device, "--max-model-len", str(args.max_model_len), "--port", "0",
                             "--shutdown-grace", "1"], args.threads, log_dir)
        procs.append(ex)
        sch, sch_addr = spawn("scheduler", "services.scheduler",
                              ["--executor-address", ex_addr, "--port", "0", "--max-model-len",
                               str(args.max_model_len), "--max-queue-len", "0", "--shutdown-grace", "1"],
                              args.threads, log_dir)
        procs.append(sch)
        cfg = EngineConfig(device=args.device, max_model_len=args.max_model_len)
        core = EngineCore(cfg, LocalExecutor(cfg))  # loads while the executor service loads
        wait_serving(ex_addr, proc=ex)
        wait_serving(sch_addr, proc=sch)
        print(f"in-process engine ({core.info.model_name} on {core.info.device}) and services (executor {ex_addr}, "
              f"scheduler {sch_addr}) ready in {time.perf_counter() - t0:.1f}s", flush=True)
        warm_prompts = make_prompts(4, args.input_len, seed=7)
        run_inprocess(core, warm_prompts, warm, 4, "warmup")
        asyncio.run(run_service(sch_addr, warm_prompts, warm, 4, "warmup"))
        for c in args.concurrency:
            n = args.c1_prompts if c == 1 else args.num_prompts
            for rep in range(args.repeats):
                prompts = make_prompts(n, args.input_len, seed=1000 + 10 * c + rep)
                tag = f"c{c}r{rep}"
                for path in (("in-process", "services") if rep % 2 == 0 else ("services", "in-process")):
                    if path == "in-process":
                        r = run_inprocess(core, prompts, params, c, tag)
                        inproc.append(r)
                    else:
                        r = asyncio.run(run_service(sch_addr, prompts, params, c, tag))
                        svc.append(r)
                    r["repeat"] = rep
                    _show(r, rep)
    finally:
        for p in reversed(procs):
            p.stop(grace=10)
        if core is not None:
            core.shutdown()
    return inproc, svc


# ================================================================ parts 2 and 3: model-free
def realistic_fake_executor_cls():
    """FakeExecutor whose sampled ids look like SmolLM2's (1000..49151: 2-3 byte varints)."""
    sys.path.insert(0, str(ROOT))
    from tests.integration.fake_executor import FakeExecutor

    class RealisticIds(FakeExecutor):
        @staticmethod
        def next_token(last: int, position: int) -> int:
            return 1000 + (last * 31 + position) % 48152

    return RealisticIds


def _fake_core(executor, num_seqs: int):
    from engine_core.config import EngineConfig
    from engine_core.engine_core import EngineCore

    cfg = EngineConfig(device="cpu", max_model_len=512, num_gpu_blocks_override=FAKE_BLOCKS, max_num_seqs=num_seqs)
    return EngineCore(cfg, executor)


def _fake_requests(core, n: int, args, seed: int) -> list[str]:
    from engine_core.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=args.fake_output_len, ignore_eos=True)
    rng = random.Random(seed)
    ids = [f"cmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}" for _ in range(n)]
    for rid in ids:  # ids < 999: FakeExecutor's vocabulary (999 is its failure trigger)
        core.add_request(rid, [rng.randrange(1, 999) for _ in range(args.input_len)], sp)
    return ids


def bytes_per_step(args) -> list[dict]:
    """Real scheduler decode steps at N running requests, serialized like GrpcExecutor does."""
    from engine_core.executor.base import Executor
    from services import convert

    class Probe(Executor):
        def __init__(self, inner):
            self.inner, self.rows = inner, []

        def describe(self):
            return self.inner.describe()

        def execute(self, so):
            res = self.inner.execute(so)
            decode = (not so.scheduled_new_reqs and so.total_num_scheduled_tokens == len(so.scheduled_cached_reqs))
            self.rows.append((decode, len(so.scheduled_cached_reqs), convert.scheduler_output_to_proto(so).ByteSize(),
                              convert.model_runner_output_to_proto(res).ByteSize(),
                              sum(len(r.new_block_ids) for r in so.scheduled_cached_reqs)))
            return res

        def reset(self):
            self.inner.reset()

        def shutdown(self):
            self.inner.shutdown()

    out = []
    for n in args.running:
        probe = Probe(realistic_fake_executor_cls()(None, num_blocks=FAKE_BLOCKS, max_model_len=512))
        core = _fake_core(probe, max(n, 256))
        _fake_requests(core, n, args, seed=n)
        while core.has_unfinished_requests():
            core.step()
        rows = [r for r in probe.rows if r[0] and r[1] == n]
        batch = [r[2] for r in rows]
        result = [r[3] for r in rows]
        out.append({"running": n, "decode_steps": len(rows),
                    "step_batch_bytes_mean": statistics.fmean(batch), "step_batch_bytes_min": min(batch),
                    "step_batch_bytes_max": max(batch),
                    "step_result_bytes_mean": statistics.fmean(result),
                    "total_bytes_mean": statistics.fmean(b + r for b, r in zip(batch, result)),
                    "bytes_per_request_per_step": statistics.fmean(b + r for b, r in zip(batch, result)) / n,
                    "steps_with_new_blocks": sum(1 for r in rows if r[4])})
        print(f"  bytes/decode step at {n} running: StepBatch {out[-1]['step_batch_bytes_mean']:.0f} + "
              f"StepResult {out[-1]['step_result_bytes_mean']:.0f} B", flush=True)
    return out


def hop_overhead(args, log_dir: Path) -> list[dict]:
    """Decode-step wall time with the model-free executor in-process vs over gRPC."""
    from services.executor_client import GrpcExecutor
    from tests.integration.fake_executor import FakeExecutor

    def decode_step_times(core, n: int, seed: int) -> tuple[list[float], int]:
        ids = set(_fake_requests(core, n, args, seed))
        times, steps = [], 0
        while core.has_unfinished_requests():
            t = time.perf_counter()
            deltas = core.step()
            dt_ = time.perf_counter() - t
            steps += 1
            if len(deltas) == n and all(d.request_id in ids and d.num_output_tokens >= 2 and
                                        len(d.new_token_ids) == 1 for d in deltas):
                times.append(dt_)
        return times, steps

    proc, addr = spawn("fake-executor", "services.executor",
                       ["--executor", FAKE_EXECUTOR, "--num-gpu-blocks-override", str(FAKE_BLOCKS),
                        "--max-model-len", "512", "--port", "0", "--shutdown-grace", "1"], args.threads, log_dir)
    out = []
    try:
        remote = GrpcExecutor(addr, wait_ready_s=60, track_bytes=True)
        local_core = _fake_core(FakeExecutor(None, num_blocks=FAKE_BLOCKS, max_model_len=512), 256)
        remote_core = _fake_core(remote, 256)
        decode_step_times(local_core, 16, seed=1)  # warm-up (opens the step stream)
        decode_step_times(remote_core, 16, seed=1)
        for n in args.running:
            local, _ = decode_step_times(local_core, n, seed=100 + n)
            s0 = dict(vars(remote.stats))
            rem, _ = decode_step_times(remote_core, n, seed=100 + n)
            s1 = vars(remote.stats)
            nsteps = s1["steps"] - s0["steps"]
            row = {"running": n, "decode_steps": len(local),
                   "in_process_step_ms_p50": 1e3 * pct(local, 0.5), "grpc_step_ms_p50": 1e3 * pct(rem, 0.5),
                   "in_process_step_ms_mean": 1e3 * statistics.fmean(local),
                   "grpc_step_ms_mean": 1e3 * statistics.fmean(rem),
                   "grpc_executor_bytes_per_step_all_steps_mean": (s1["bytes_sent"] - s0["bytes_sent"] + s1["bytes_received"]
                                                - s0["bytes_received"]) / max(1, nsteps)}
            row["added_ms_per_step_p50"] = row["grpc_step_ms_p50"] - row["in_process_step_ms_p50"]
            out.append(row)
            print(f"  executor hop at {n} running: step p50 {row['in_process_step_ms_p50']:.2f} ms in-process, "
                  f"{row['grpc_step_ms_p50']:.2f} ms over gRPC (+{row['added_ms_per_step_p50']:.2f} ms)", flush=True)
        remote.shutdown()
    finally:
        proc.stop(grace=5)
    return out


# ================================================================ report
def aggregate(runs: list[dict], c: int) -> dict:
    rs = [r for r in runs if r["concurrency"] == c]
    ttfts = [t for r in rs for t in r["ttfts_ms"]]
    tok, el = sum(r["output_tokens"] for r in rs), sum(r["elapsed_s"] for r in rs)
    return {"requests": sum(r["requests"] for r in rs), "tok_s": tok / el, "ttft_p50_ms": pct(ttfts, 0.5),
            "ttft_p90_ms": pct(ttfts, 0.9), "per_repeat_tok_s": [r["output_tok_s"] for r in rs],
            "tokens": [t for r in rs for t in r["tokens"]]}


def compare(inproc: list[dict], svc: list[dict], levels: list[int]) -> list[dict]:
    """Per level, pooled over repeats: tok/s = all tokens / all run time; TTFT p50 of all requests."""
    rows = []
    for c in levels:
        a, b = aggregate(inproc, c), aggregate(svc, c)
        same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
        rows.append({"concurrency": c, "requests": a["requests"],
                     "in_process_tok_s": a["tok_s"], "services_tok_s": b["tok_s"],
                     "throughput_ratio": b["tok_s"] / a["tok_s"],
                     "throughput_ratio_per_repeat": [y / x for x, y in zip(a["per_repeat_tok_s"], b["per_repeat_tok_s"])],
                     "in_process_ttft_p50_ms": a["ttft_p50_ms"], "services_ttft_p50_ms": b["ttft_p50_ms"],
                     "added_ttft_p50_ms": b["ttft_p50_ms"] - a["ttft_p50_ms"],
                     "in_process_ttft_p90_ms": a["ttft_p90_ms"], "services_ttft_p90_ms": b["ttft_p90_ms"],
                     "greedy_tokens_equal": f"{same}/{a['requests']}"})
    return rows


def print_tables(rows, nbytes, hop) -> None:
    print("\n| concurrency | in-process tok/s | services tok/s | ratio | in-process TTFT p50 | services TTFT p50 "
          "| added TTFT p50 | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['in_process_tok_s']:.1f} | {r['services_tok_s']:.1f} | "
              f"{r['throughput_ratio']:.3f} | {r['in_process_ttft_p50_ms']:.1f} ms | {r['services_ttft_p50_ms']:.1f} ms | "
              f"{r['added_ttft_p50_ms']:+.1f} ms | {r['greedy_tokens_equal']} |")
    print("\n| running | StepBatch B | StepResult B | total B/step | B/request/step | hop p50 in-process | "
          "hop p50 gRPC | added/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, h in zip(nbytes, hop or [None] * len(nbytes)):
        hp = (f"{h['in_process_step_ms_p50']:.2f} ms | {h['grpc_step_ms_p50']:.2f} ms | "
              f"{h['added_ms_per_step_p50']:+.2f} ms") if h else "- | - | -"
        print(f"| {b['running']} | {b['step_batch_bytes_mean']:.0f} | {b['step_result_bytes_mean']:.0f} | "
              f"{b['total_bytes_mean']:.0f} | {b['bytes_per_request_per_step']:.1f} | {hp} |")


def plot(path: Path, rows, nbytes, hop, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if hop else 3, figsize=(18 if hop else 14, 4.2))
    labels = [f"c={r['concurrency']}" for r in rows]
    x = range(len(rows))
    w = 0.38

    def bars(ax, left, right, names, ylabel, fmt):
        b1 = ax.bar([i - w / 2 for i in x], left, w, label=names[0], color="#4c72b0")
        b2 = ax.bar([i + w / 2 for i in x], right, w, label=names[1], color="#dd8452")
        ax.bar_label(b1, fmt=fmt, fontsize=8)
        ax.bar_label(b2, fmt=fmt, fontsize=8)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    bars(axes[0], [r["in_process_tok_s"] for r in rows], [r["services_tok_s"] for r in rows],
         ("in-process", "services (gRPC)"), "output tok/s", "%.1f")
    axes[0].set_title("throughput (ratio " + ", ".join(f"{r['throughput_ratio']:.3f}" for r in rows) + ")")
    bars(axes[1], [r["in_process_ttft_p50_ms"] for r in rows], [r["services_ttft_p50_ms"] for r in rows],
         ("in-process", "services (gRPC)"), "TTFT p50 (ms)", "%.0f")
    axes[1].set_title("TTFT p50 (added " + ", ".join(f"{r['added_ttft_p50_ms']:+.1f}" for r in rows) + " ms)")
    ax = axes[2]
    xs = range(len(nbytes))
    b1 = ax.bar([i - w / 2 for i in xs], [b["step_batch_bytes_mean"] for b in nbytes], w, label="StepBatch",
                color="#55a868")
    b2 = ax.bar([i + w / 2 for i in xs], [b["step_result_bytes_mean"] for b in nbytes], w, label="StepResult",
                color="#8172b2")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(xs), [f"{b['running']} running" for b in nbytes])
    ax.set_ylabel("bytes per decode step")
    ax.set_title("protobuf bytes per decode step")
    ax.legend(fontsize=8)
    if hop:
        ax = axes[3]
        xs = range(len(hop))
        b1 = ax.bar([i - w / 2 for i in xs], [h["in_process_step_ms_p50"] for h in hop], w, label="in-process",
                    color="#4c72b0")
        b2 = ax.bar([i + w / 2 for i in xs], [h["grpc_step_ms_p50"] for h in hop], w, label="over gRPC",
                    color="#dd8452")
        ax.bar_label(b1, fmt="%.2f", fontsize=8)
        ax.bar_label(b2, fmt="%.2f", fontsize=8)
        ax.set_xticks(list(xs), [f"{h['running']} running" for h in hop])
        ax.set_ylabel("decode step p50 (ms)")
        ax.set_title("model-free step: executor hop cost")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both engines (OMP_NUM_THREADS of the executor process); "
                        "default 1: on a small shared CPU more threads oversubscribe it (10x slower steps here)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=64, help="requests at each concurrency > 1")
    p.add_argument("--c1-prompts", type=int, default=4, help="requests at concurrency 1 (sequential: kept small)")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--repeats", type=int, default=2, help="interleaved in-process/services runs per level")
    p.add_argument("--running", default="64,256", help="running requests for bytes per decode step")
    p.add_argument("--fake-output-len", type=int, default=32, help="decode steps of the model-free parts")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--skip-model", action="store_true", help="only the model-free parts 2 and 3")
    p.add_argument("--out", default=None, help="output path without extension "
                                               "(default benchmarks/results/grpc_overhead_<device>_<date>)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.running = [int(n) for n in args.running.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else RESULTS / f"grpc_overhead_{args.device}_{date}"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"grpc_overhead_logs_{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_all = time.perf_counter()

    print("bytes per decode step (model-free, real scheduler):", flush=True)
    nbytes = bytes_per_step(args)
    print("executor hop (model-free executor, in-process vs gRPC):", flush=True)
    hop = hop_overhead(args, log_dir)

    rows, inproc, svc = [], [], []
    if not args.skip_model:
        print("model run (in-process EngineCore + LocalExecutor vs scheduler service -> executor service):", flush=True)
        inproc, svc = model_phase(args, log_dir)
        rows = compare(inproc, svc, args.concurrency)
    print_tables(rows, nbytes, hop)

    c64 = next((r for r in rows if r["concurrency"] == 64), None)
    targets = None
    if c64 is not None:
        loss = 1 - c64["throughput_ratio"]
        targets = {"throughput_loss_c64": loss, "throughput_target_met": loss <= TARGET_THROUGHPUT_LOSS,
                   "added_ttft_p50_ms_c64": c64["added_ttft_p50_ms"],
                   "ttft_target_met": c64["added_ttft_p50_ms"] <= TARGET_TTFT_MS,
                   "targets": f"<= {TARGET_THROUGHPUT_LOSS:.0%} throughput, <= {TARGET_TTFT_MS} ms TTFT p50 at c=64"}
        print(f"\ntargets at c=64: throughput loss {loss:+.1%} ({'met' if targets['throughput_target_met'] else 'NOT met'}), "
              f"added TTFT p50 {c64['added_ttft_p50_ms']:+.1f} ms ({'met' if targets['ttft_target_met'] else 'NOT met'})")
    device = f"{args.device}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), " \
             f"torch threads {args.threads}" if args.device == "cpu" else args.device
    if args.device == "cuda" and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    result = {
        "meta": {"date": date, "device": device, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "model": "SmolLM2-135M-Instruct (embedded GGUF), float32" if args.device == "cpu" else "embedded SmolLM2",
                 "python": platform.python_version(), "torch": torch.__version__,
                 "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                 "wall_s": time.perf_counter() - t_all,
                 "workload": {"input_len": args.input_len, "output_len": args.output_len, "ignore_eos": True,
                              "temperature": 0.0, "repeats": args.repeats,
                              "requests_per_repeat": {str(c): args.c1_prompts if c == 1 else args.num_prompts
                                                      for c in args.concurrency},
                              "max_model_len": args.max_model_len},
                 "notes": "TTFT: request sent -> first token received by the driver (in-process: the engine step "
                          "that returned it). Throughput: output tokens / (last request done - first sent). "
                          "Bytes: protobuf ByteSize of StepBatch / StepResult of pure decode steps (no gRPC/HTTP2 "
                          "framing); request ids 'cmpl-<32 hex>' like the gateway's."},
        "comparison": rows, "targets": targets,
        "in_process": [{k: v for k, v in r.items() if k != "tokens"} for r in inproc],
        "services": [{k: v for k, v in r.items() if k != "tokens"} for r in svc],
        "bytes_per_decode_step": nbytes, "executor_hop_model_free": hop,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(out.with_suffix(".png"), rows, nbytes, hop,
             f"gRPC split vs in-process — {device}, {args.input_len} in / {args.output_len} out, {date}")
    except ImportError as e:
        print(f"no plot ({e})")
    print(f"\nwrote {out.with_suffix('.json')} and .png (logs in {log_dir}); {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
