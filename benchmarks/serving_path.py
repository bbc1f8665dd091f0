"""Serving path at engine speed (issue 14): the same requests through three paths, per model config
and concurrency C:

1. offline  — the in-process EngineCore (LocalExecutor) driven as a closed loop with C requests in
              flight (token ids in and out, no tokenizer): the engine's own speed;
2. grpc     — the scheduler service's gRPC API (token ids), C requests in flight: on one
              `GenerateStream` (the batched API the gateway uses; default) or as C per-request
              `Generate` calls (--grpc-api generate);
3. gateway  — the OpenAI HTTP gateway, C streaming /v1/completions clients (detokenized text, SSE).

Paths 2 and 3 run against one `pagedserve serve` stack (executor, scheduler, tokenizer, gateway
with --gateway-workers); path 1 runs first and frees the device before the stack starts. Dummy
random weights (`dummy:<config>`), greedy, ignore_eos: every request makes exactly --output-len
tokens. Prompts are random token ids, fresh per (path, C), so the prefix cache never hits. Clients
of paths 2 and 3 are spread over --client-procs processes, and the HTTP client is a lean asyncio
one (benchmarks/sse_client.py), so that the client is not the bottleneck.

The tokenizer of a dummy config is synthetic and byte-level (GPT-2 byte alphabet + one word per
remaining id, ByteLevel decoder), sized to the config's vocabulary, so any sampled id detokenizes
and partial UTF-8 sequences exercise the hold-back path.

Reports per path and C: output tok/s, TPOT p50, TTFT p50 (and the offline engine's mean step
time); `ratios` = throughput of gateway / offline at C=64, 256 and grpc / offline at C=256, per
config; goals: gateway >= 90 % of offline at 64 and 256, gateway TPOT p50 <= 1.15 x offline step
time, TTFT added by the stack <= 3 ms at C=1.

GPU (the issue's run; one config per call, merged into one JSON + PNG by --append):
    python benchmarks/serving_path.py --device cuda --configs smollm2-135m-instruct \\
        --concurrency 1,64,256 --num-prompts 1024 --c1-prompts 16 --input-len 128 --output-len 128 \\
        --gateway-workers 4 --client-procs 4 --out benchmarks/results/serving_path_h200.json --append
    (the same with --configs llama-3.1-8b-instruct)
CPU smoke (tests/integration/test_serving_path.py): a tiny config, a few requests.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.grpc_overhead import closed_loop, make_prompts, pct, wait_serving
from benchmarks.servers import start_pagedserve
from services.internal_auth import TOKEN_ENV, InternalSecurity

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "benchmarks" / "configs"
SCHEDULER_LINE = re.compile(r"^scheduler\s+ready on (\S+)")
GOAL_THROUGHPUT = 0.90
GOAL_TPOT = 1.15
GOAL_TTFT_MS = 3.0


# ---------------------------------------------------------------------------- setup
def config_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix == ".json" and p.exists() else CONFIGS / f"{name}.json"


def config_name(name: str) -> str:
    return config_path(name).stem


def synthetic_tokenizer(vocab_size: int, eos_token_id: int, out_dir: Path) -> Path:
    """A byte-level tokenizer of exactly `vocab_size` ids: the 256 byte symbols, then `Ġw<i>` words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import (
        bytes_to_unicode as _bytes_to_unicode,
    )

    alphabet = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), vocab_size):
        vocab[f"Ġw{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=alphabet[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    eos = next(k for k, v in vocab.items() if v == min(eos_token_id, vocab_size - 1))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 1 << 20}))
    return out_dir


def summarize(path: str, c: int, recs: list[tuple[float, float | None, float, int]]) -> dict:
    """recs: (sent, first token, end, tokens) per request, in seconds of one monotonic clock."""
    t0 = min(r[0] for r in recs)
    elapsed = max(r[2] for r in recs) - t0
    toks = sum(r[3] for r in recs)
    ttfts = [r[1] - r[0] for r in recs if r[1] is not None]
    tpots = [(r[2] - r[1]) / (r[3] - 1) for r in recs if r[1] is not None and r[3] > 1]
    return {"path": path, "concurrency": c, "requests": len(recs), "output_tokens": toks, "elapsed_s": elapsed,
            "output_tok_s": toks / elapsed if elapsed > 0 else 0.0,
            "ttft_p50_ms": 1e3 * pct(ttfts, 0.5), "ttft_p90_ms": 1e3 * pct(ttfts, 0.9),
            "tpot_p50_ms": 1e3 * pct(tpots, 0.5), "tpot_p90_ms": 1e3 * pct(tpots, 0.9)}


# ---------------------------------------------------------------------------- path 1: offline
def run_offline(core, prompts: list[list[int]], params, c: int, tag: str) -> dict:
    """Closed loop: keep `c` requests in the engine; a finished one is replaced at once."""
    steps0 = core.counters.num_steps
    recs = [(t.sent, t.first, t.end, len(t.token_ids)) for t in closed_loop(core, prompts, params, c, tag)]
    out = summarize("offline", c, recs)
    out["engine_steps"] = core.counters.num_steps - steps0
    out["step_ms"] = 1e3 * out["elapsed_s"] / max(1, out["engine_steps"])
    return out


def offline_phase(args, cfg: Path, tok_dir: Path) -> tuple[list[dict], str]:
    """(runs, device name): run in a child process, which alone touches the device here."""
    from engine_core.config import EngineConfig
    from engine_core.engine_core import EngineCore
    from engine_core.executor.local import LocalExecutor

    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    config = EngineConfig(model=f"dummy:{cfg}", tokenizer=str(tok_dir), device=args.device, dtype=args.dtype,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    core = EngineCore(config, LocalExecutor(config))
    runs = []
    try:
        run_offline(core, make_prompts(4, args.input_len, 7, hi=args.vocab_hi), params(args, 4), 4, "warm")
        for c in args.concurrency:
            prompts = make_prompts(n_prompts(args, c), args.input_len, 100 + c, hi=args.vocab_hi)
            r = run_offline(core, prompts, params(args, args.output_len), c, f"c{c}")
            show(r)
            runs.append(r)
    finally:
        core.shutdown()
    return runs, device_name(args.device)


def params(args, max_tokens: int):
    from engine_core.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def n_prompts(args, c: int) -> int:
    return args.c1_prompts if c == 1 else max(args.num_prompts, c)


# ---------------------------------------------------------------------------- paths 2 and 3: clients
async def _grpc_client(addr: str, work: list[tuple[int, list[int]]], c: int, max_tokens: int, tag: str) -> list:

    from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
    from services.grpc_server import channel_options

    sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    recs = []
    async with InternalSecurity.from_env().aio_channel(addr, channel_options()) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        sem = asyncio.Semaphore(c)

        async def one(i: int, p: list[int]) -> None:
            async with sem:
                t0, first, n = time.monotonic(), None, 0
                req = scheduler_pb2.GenerateRequest(request_id=f"grpc-{tag}-{i}", prompt_token_ids=p, sampling_params=sp)
                async for msg in stub.Generate(req, timeout=3600):
                    if msg.token_ids:
                        first = first or time.monotonic()
                        n += len(msg.token_ids)
                recs.append((t0, first, time.monotonic(), n))

        await asyncio.gather(*(one(i, p) for i, p in work))
    return recs


async def _grpc_stream_client(addr: str, work: list[tuple[int, list[int]]], c: int, max_tokens: int,
                              tag: str) -> list:
    """C requests in flight on one Scheduler.GenerateStream (the batched API the gateway uses: one
    message per engine step for all of them), a finished one replaced at once."""

    from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
    from services.grpc_server import channel_options

    sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    todo = list(reversed(work))
    inflight: dict[int, list] = {}  # key -> [sent, first token, tokens]
    recs = []
    async with InternalSecurity.from_env().aio_channel(addr, channel_options()) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).GenerateStream(timeout=3600)

        async def add(k: int) -> None:
            msg = scheduler_pb2.GenerateStreamRequest()
            for _ in range(min(k, len(todo))):
                i, p = todo.pop()
                key = i + 1
                inflight[key] = [time.monotonic(), None, 0]
                msg.add.add(key=key, request=scheduler_pb2.GenerateRequest(
                    request_id=f"grpcs-{tag}-{i}", prompt_token_ids=p, sampling_params=sp))
            if msg.add:
                await call.write(msg)

        await add(c)
        while inflight:
            msg = await call.read()
            now = time.monotonic()
            if msg.errors:
                raise RuntimeError(f"GenerateStream: {msg.errors[0].message}")
            for key, n in zip(msg.keys, msg.num_tokens):
                rec = inflight[key]
                rec[1] = rec[1] or now
                rec[2] += n
            done = 0
            for o in msg.outputs:
                rec = inflight[o.key]
                if o.response.token_ids:
                    rec[1] = rec[1] or now
                    rec[2] += len(o.response.token_ids)
                if o.response.finish_reason != scheduler_pb2.FINISH_REASON_UNSPECIFIED:
                    recs.append((rec[0], rec[1], now, rec[2]))
                    del inflight[o.key]
                    done += 1
            await add(done)
        call.cancel()
    return recs


async def _http_client(url: str, work: list[tuple[int, list[int]]], c: int, max_tokens: int, tag: str) -> list:
    """C keep-alive connections, each a closed loop over the shared work (benchmarks/sse_client.py:
    a lean client, so that the client is not what is measured)."""
    from benchmarks.sse_client import SSEConnection

    recs = []
    todo = list(reversed(work))

    async def worker() -> None:
        conn = await SSEConnection.open(url)
        try:
            while todo:
                _, p = todo.pop()
                body = json.dumps({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                                   "stream": True, "stream_options": {"include_usage": True}}).encode()
                t0, first, n = time.monotonic(), None, 0
                async for data in conn.post_stream("/v1/completions", body):
                    if first is None and b'"text":"' in data and b'"text":""' not in data:
                        first = time.monotonic()
                    elif b'"usage":{' in data:
                        n = json.loads(data)["usage"]["completion_tokens"]
                recs.append((t0, first, time.monotonic(), n))
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(min(c, len(work)))))
    return recs


def _client_proc(kind: str, target: str, work, c: int, max_tokens: int, tag: str, start_at: float) -> list:
    fn = {"grpc": _grpc_stream_client, "grpc-generate": _grpc_client, "http": _http_client}[kind]
    time.sleep(max(0.0, start_at - time.monotonic()))  # every process starts together
    return asyncio.run(fn(target, work, c, max_tokens, tag))


def run_clients(kind: str, target: str, prompts: list[list[int]], c: int, args, tag: str) -> dict:
    k = max(1, min(args.client_procs, c))
    shares = [(c // k) + (1 if j < c % k else 0) for j in range(k)]
    work = [[(i, p) for i, p in enumerate(prompts) if i % k == j] for j in range(k)]
    if k == 1:
        recs = _client_proc(kind, target, work[0], c, args.output_len, tag, 0.0)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(k) as pool:
            start_at = time.monotonic() + 3.0  # the spawned interpreters are up by then
            parts = pool.starmap(_client_proc, [(kind, target, work[j], shares[j], args.output_len, f"{tag}p{j}",
                                                 start_at) for j in range(k)])
        recs = [r for part in parts for r in part]
    return summarize(kind, c, recs)


def scheduler_address(server, timeout: float = 30.0) -> str:
    """The scheduler's host:port from `pagedserve serve`'s output, once it is SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        sched = next((m.group(1) for line in list(server.tail) if (m := SCHEDULER_LINE.search(line))), None)
        if sched:
            wait_serving(sched, proc=server)
            return sched
        if time.monotonic() > deadline:
            raise RuntimeError(f"no scheduler address in the launcher's output:\n{server.output()}")
        time.sleep(0.1)


def stack_phase(args, cfg: Path, tok_dir: Path) -> list[dict]:
    from services.gen.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

    extra = ["--tokenizer", str(tok_dir), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
             "--max-num-seqs", str(args.max_num_seqs), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
             "--gateway-workers", str(args.gateway_workers), "--max-queue-len", "0", "--quiet"]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.device == "cpu" else None
    server = start_pagedserve(f"dummy:{cfg}", device=args.device, extra=extra, env=threads,
                              log_path=args.log_dir / f"stack_{cfg.stem}.log")
    runs = []
    # This phase's gRPC clients (the spawned client processes too) call the stack's scheduler
    # directly: they authenticate with its service token (services/internal_auth.py), which is in
    # the environment until the phase ends.
    previous_token = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = server.service_token
    try:
        url = server.wait_ready(args.startup_timeout)
        sched = scheduler_address(server)
        print(f"stack ready: gateway {url}, scheduler {sched}", flush=True)
        with InternalSecurity.from_env().channel(sched) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)

            def steps() -> int:
                return stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10).num_steps

            grpc_kind = "grpc" if args.grpc_api == "stream" else "grpc-generate"
            warm = make_prompts(4, args.input_len, 8, hi=args.vocab_hi)
            run_clients(grpc_kind, sched, warm, 4, args, "warm")
            run_clients("http", url, warm, 4, args, "warm")
            for c in args.concurrency:
                for kind, target in ((grpc_kind, sched), ("http", url)):
                    prompts = make_prompts(n_prompts(args, c), args.input_len, (300 if kind == "http" else 200) + c,
                                           hi=args.vocab_hi)
                    s0 = steps()
                    r = run_clients(kind, target, prompts, c, args, f"{kind}c{c}")
                    r["engine_steps"] = steps() - s0
                    r["path"] = "gateway" if kind == "http" else "grpc"
                    show(r)
                    runs.append(r)
    finally:
        server.stop(grace=20)
        if previous_token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous_token
    return runs


# ---------------------------------------------------------------------------- report
def show(r: dict) -> None:
    step = f", step {r['step_ms']:.2f} ms" if "step_ms" in r else ""
    print(f"  {r['path']:8s} c={r['concurrency']:<4d} {r['output_tok_s']:9.1f} tok/s  TPOT p50 "
          f"{r['tpot_p50_ms']:7.2f} ms  TTFT p50 {r['ttft_p50_ms']:8.2f} ms{step}", flush=True)


def ratios_and_goals(runs: list[dict]) -> tuple[dict, dict]:
    by = {(r["path"], r["concurrency"]): r for r in runs}

    def ratio(path: str, c: int) -> float | None:
        a, b = by.get((path, c)), by.get(("offline", c))
        return round(a["output_tok_s"] / b["output_tok_s"], 4) if a and b and b["output_tok_s"] else None

    ratios = {"gateway_vs_offline_c64": ratio("gateway", 64), "gateway_vs_offline_c256": ratio("gateway", 256),
              "grpc_vs_offline_c256": ratio("grpc", 256)}
    goals: dict = {}
    for c in (64, 256):
        if ratios[f"gateway_vs_offline_c{c}"] is not None:
            goals[f"throughput_c{c}"] = ratios[f"gateway_vs_offline_c{c}"] >= GOAL_THROUGHPUT
        g, o = by.get(("gateway", c)), by.get(("offline", c))
        if g and o:
            goals[f"tpot_c{c}_vs_step"] = round(g["tpot_p50_ms"] / o["step_ms"], 3)
    g1, o1 = by.get(("gateway", 1)), by.get(("offline", 1))
    if g1 and o1:
        goals["ttft_added_c1_ms"] = round(g1["ttft_p50_ms"] - o1["ttft_p50_ms"], 3)
        goals["ttft_c1_ok"] = goals["ttft_added_c1_ms"] <= GOAL_TTFT_MS
    return ratios, goals


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        runs = result["configs"][name]["runs"]
        levels = sorted({r["concurrency"] for r in runs})
        for row, (key, label) in enumerate((("output_tok_s", "output tok/s"), ("tpot_p50_ms", "TPOT p50 (ms)"))):
            ax = axes[row][col]
            width = 0.27
            for j, p in enumerate(("offline", "grpc", "gateway")):
                vals = [next((r[key] for r in runs if r["path"] == p and r["concurrency"] == c), 0) for c in levels]
                ax.bar([i + (j - 1) * width for i in range(len(levels))], vals, width, label=p)
            ax.set_xticks(range(len(levels)), [f"C={c}" for c in levels])
            ax.set_title(f"{name}: {label}")
            ax.legend()
    fig.suptitle(f"serving path vs in-process engine\n{result['device']}, {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="smollm2-135m-instruct,llama-3.1-8b-instruct",
                   help="benchmarks/configs names or config.json paths, comma-separated")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", default="1,64,256")
    p.add_argument("--num-prompts", type=int, default=1024, help="requests per level (at least C)")
    p.add_argument("--c1-prompts", type=int, default=16, help="requests at concurrency 1")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--gateway-workers", type=int, default=4)
    p.add_argument("--client-procs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 4)),
                   help="benchmark client processes for the grpc and gateway paths")
    p.add_argument("--grpc-api", choices=("stream", "generate"), default="stream",
                   help="path 2 through Scheduler.GenerateStream (the batched API the gateway uses; default) or "
                        "the per-request Generate RPC")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the model on CPU (default 1)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/serving_path_<device>_<date>.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out file (its other configs' results are kept)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.config_list = [x for x in args.configs.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else RESULTS / f"serving_path_{args.device.split(':')[0]}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": "",
              "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
              "settings": {k: getattr(args, k) for k in ("concurrency", "num_prompts", "c1_prompts", "input_len",
                                                         "output_len", "max_num_seqs", "gateway_workers",
                                                         "client_procs", "dtype", "grpc_api")},
              "goals": {"gateway_vs_offline_min": GOAL_THROUGHPUT, "tpot_vs_step_max": GOAL_TPOT,
                        "ttft_added_c1_ms_max": GOAL_TTFT_MS},
              "configs": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="serving-path-") as tmp:
        args.log_dir = Path(tmp)
        for spec in args.config_list:
            cfg = config_path(spec)
            hf = json.loads(cfg.read_text())
            eos = hf.get("eos_token_id", 0)
            tok_dir = synthetic_tokenizer(hf["vocab_size"], eos[0] if isinstance(eos, list) else eos,
                                          Path(tmp) / f"tok-{cfg.stem}")
            args.vocab_hi = min(40000, hf["vocab_size"])
            name = config_name(spec)
            print(f"== {name}", flush=True)
            # In its own process: the device memory is surely free again when the stack starts.
            with mp.get_context("spawn").Pool(1) as pool:
                offline, result["device"] = pool.apply(offline_phase, (args, cfg, tok_dir))
            runs = offline + stack_phase(args, cfg, tok_dir)
            ratios, goals = ratios_and_goals(runs)
            result["configs"][name] = {"runs": runs, "goals_met": goals}
            result["ratios"][name] = ratios
            print(f"  ratios {ratios}  goals {goals}", flush=True)
    if args.append and out.exists():  # configs run separately (one device call each) end up in one file
        old = json.loads(out.read_text())
        result["configs"] = {**old.get("configs", {}), **result["configs"]}
        result["ratios"] = {**old.get("ratios", {}), **result["ratios"]}
        result["command"] = [*([old["command"]] if isinstance(old["command"], str) else old["command"]),
                             result["command"]]
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not args.no_plot:
        png = out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
