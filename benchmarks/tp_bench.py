"""Tensor-parallel benchmark: TP=1 vs TP=2 vs TP=4 on one host, same dummy weights, same run.

    python benchmarks/tp_bench.py                                  # Llama-3.1-8B config, TP 1,2,4
    python benchmarks/tp_bench.py --tp 1,2 --with-tp1-multiproc    # + TP=1 through the worker path

Needs one GPU per rank (a multi-GPU device kind for TP > 1; sizes above the visible GPU count are
skipped and listed in the JSON). Every TP size runs in its own child process (a clean GPU each
time); TP > 1 is MultiprocExecutor (N worker processes, NCCL), TP=1 the plain LocalExecutor.
`--with-tp1-multiproc` adds TP=1 through MultiprocExecutor (one NCCL worker): the cost of the
process hop alone.

Measured per TP size, bf16, CUDA graphs (unless --enforce-eager):
- bs1: one request, --input-len in / --output-len out (ignore_eos). decode tok/s = decode steps /
  their summed wall time (the first step is the prefill); e2e tok/s = output tokens / total time.
- bs{--batch}: that many requests at once; output tok/s = all output tokens / wall time.
- identical greedy tokens vs TP=1, per request (the bf16 runs above, plus a short float32 pass:
  --identity-requests x --identity-tokens, eager). TP changes the summation order of o_proj /
  down_proj (partial sums, then all-reduce), so bf16 logits differ from TP=1 in the last bits and
  random-weight near-ties can flip a greedy token; float32 shows whether the math is the same.
Target (issue 10): TP=2 bs1 decode >= 1.6x TP=1.

Writes benchmarks/results/tp_bench_<config>_<date>.json (--out to override). CPU dry run of the
harness: --device cpu --config <tiny config> --tp 1,2 --input-len 16 --output-len 8 --batch 4.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")
TARGET_TP2_BS1_SPEEDUP = 1.6


# ---------------------------------------------------------------------------- one TP size (child)
def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    return torch.randint(100, vocab, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine, prompts, params, tag: str) -> tuple[list[list[int]], list[float], float]:
    """Drive the engine step by step: (tokens per request, wall time of each step, total time)."""
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    tokens: dict[str, list[int]] = {}
    steps: list[float] = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - ts)
        for o in outs:
            if o.finished:
                tokens[o.request_id] = list(o.outputs[0].token_ids)
    total = time.perf_counter() - t0
    return [tokens[f"{tag}-{i}"] for i in range(len(prompts))], steps, total


def _engine(args, tp: int, multiproc: bool, dtype: str, eager: bool, max_num_seqs: int):
    from engine_core.config import EngineConfig
    from engine_core.executor import make_executor
    from engine_core.executor.multiproc import MultiprocExecutor
    from engine_core.llm_engine import LLMEngine

    max_len = max(64, args.input_len + args.output_len + 16)
    kw = {"dtype": dtype, "device": args.device, "max_model_len": max_len, "max_num_seqs": max_num_seqs,
          "max_num_batched_tokens": max(8192, max_len), "tensor_parallel_size": tp, "enforce_eager": eager,
          "seed": 0, "enable_prefix_caching": False}
    if args.device == "cpu":
        kw["kv_cache_memory_gb"] = 0.25
    else:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    config = EngineConfig(model=f"dummy:{args.config}", **kw)
    t0 = time.perf_counter()
    executor = MultiprocExecutor(config) if multiproc else make_executor(config)
    return LLMEngine(config, executor=executor), time.perf_counter() - t0


def child(args) -> dict:

    from engine_core.sampling_params import SamplingParams

    tp, multiproc = args.child_tp, args.child_multiproc
    if args.child_mode == "identity":  # float32, eager: is the sharded math the same math?
        engine, _ = _engine(args, tp, multiproc, "float32", True, args.identity_requests)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=args.identity_tokens, ignore_eos=True)
            vocab = engine.core.info.vocab_size
            toks, _, _ = _run(engine, _prompts(args.identity_requests, args.input_len, vocab, 3), params, "fp32")
        finally:
            engine.shutdown()
        return {"tokens_fp32": toks}
    engine, startup = _engine(args, tp, multiproc, args.dtype, args.enforce_eager, max(args.batch, 1))
    info = engine.core.info
    ex = engine.core.executor
    vocab = info.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    out: dict = {"tp": tp, "executor": type(ex).__name__, "startup_s": startup, "num_kv_blocks": info.num_kv_blocks,
                 "kv_heads_per_rank": info.num_kv_heads, "devices": info.device, "dtype": info.dtype}
    try:
        _run(engine, _prompts(2, 16, vocab, 1), SamplingParams(temperature=0.0, max_tokens=8), "warm")
        p1 = _prompts(1, args.input_len, vocab, 0)
        toks1, steps, total = _run(engine, p1, greedy, "bs1")
        out.update(bs1_decode_tok_s=(len(steps) - 1) / sum(steps[1:]), bs1_e2e_tok_s=len(toks1[0]) / total,
                   bs1_ttft_s=steps[0], bs1_elapsed_s=total)
        pb = _prompts(args.batch, args.input_len, vocab, 2)
        toksb, steps, total = _run(engine, pb, greedy, "bsN")
        out.update({"batch": args.batch, f"bs{args.batch}_output_tok_s": sum(map(len, toksb)) / total,
                    f"bs{args.batch}_elapsed_s": total})
        out["step_payload_bytes"] = getattr(ex, "last_step_bytes", None)
        out["tokens_bf16"] = toks1 + toksb
    finally:
        engine.shutdown()
    return out


def _child_run(args, tp: int, multiproc: bool, mode: str) -> tuple[dict | None, str | None]:
    """Run one child (a fresh process, a clean GPU); (its result, or why it failed)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child-tp", str(tp), "--child-out", path,
           "--child-mode", mode]
    if multiproc:
        cmd.append("--child-multiproc")
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, check=False)
        if proc.returncode != 0:
            return None, f"{mode}: exit code {proc.returncode}"
        with open(path) as f:
            return json.load(f), None
    except subprocess.TimeoutExpired:
        return None, f"{mode}: timed out after {args.timeout}s"
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------- parent
def _identity(ref: list[list[int]], got: list[list[int]]) -> dict:
    first = []
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        first.append(n if n is not None or len(a) == len(b) else min(len(a), len(b)))
    same = sum(1 for f in first if f is None)
    return {"identical_requests": same, "requests": len(ref),
            "first_divergence": [f for f in first if f is not None][:16]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join("benchmarks", "configs", "llama-3.1-8b-instruct.json"))
    ap.add_argument("--tp", default="1,2,4", help="comma-separated TP sizes (TP=1 is the reference)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--identity-requests", type=int, default=8, help="float32 identity pass (0: skip)")
    ap.add_argument("--identity-tokens", type=int, default=64)
    ap.add_argument("--with-tp1-multiproc", action="store_true", help="also TP=1 through MultiprocExecutor")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per TP size")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child-tp", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-multiproc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", default="speed", choices=["speed", "identity"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child_tp is not None:
        with open(args.child_out, "w") as f:
            json.dump(child(args), f)
        return 0

    import torch

    sizes = sorted({int(s) for s in args.tp.split(",")} | {1})
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    runs = [(1, False)] + ([(1, True)] if args.with_tp1_multiproc else []) + [(n, True) for n in sizes if n > 1]
    results, skipped = [], []
    for tp, multiproc in runs:
        if args.device == "cuda" and tp > gpus:
            skipped.append({"tp": tp, "why": f"{gpus} GPU(s) visible"})
            print(f"TP={tp}: skipped ({gpus} GPUs visible)", flush=True)
            continue
        print(f"TP={tp} ({'MultiprocExecutor' if multiproc else 'LocalExecutor'}) ...", flush=True)
        r, why = _child_run(args, tp, multiproc, "speed")
        if r is None:
            skipped.append({"tp": tp, "multiproc": multiproc, "why": why})
            continue
        if args.identity_requests > 0:
            ident, why = _child_run(args, tp, multiproc, "identity")
            if ident is None:
                r["identity_error"] = why
            else:
                r.update(ident)
        r["multiproc"] = multiproc
        results.append(r)
        show = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if not k.startswith("tokens")}
        print(show, flush=True)

    ref = next((r for r in results if r["tp"] == 1 and not r["multiproc"]), None)
    bsn = f"bs{args.batch}_output_tok_s"
    for r in results:
        if ref is None or r is ref:
            continue
        r["speedup_vs_tp1"] = {"bs1_decode": r["bs1_decode_tok_s"] / ref["bs1_decode_tok_s"],
                               f"bs{args.batch}": r[bsn] / ref[bsn]}
        r["identical_to_tp1"] = {"bfloat16": _identity(ref["tokens_bf16"], r["tokens_bf16"])}
        if "tokens_fp32" in r and "tokens_fp32" in ref:
            r["identical_to_tp1"]["float32"] = _identity(ref["tokens_fp32"], r["tokens_fp32"])
    for r in results:
        r.pop("tokens_bf16", None)
        r.pop("tokens_fp32", None)
    tp2 = next((r for r in results if r["tp"] == 2), None)
    name = os.path.splitext(os.path.basename(args.config))[0]
    date = dt.date.today().isoformat()
    report = {
        "meta": {"date": date, "command": "python benchmarks/tp_bench.py " + " ".join(sys.argv[1:]),
                 "devices": [torch.cuda.get_device_name(i) for i in range(gpus)] if gpus else ["cpu"],
                 "torch": torch.__version__,
                 "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None,
                 "config": args.config, "weights": "dummy (random)", "dtype": args.dtype,
                 "input_len": args.input_len, "output_len": args.output_len, "batch": args.batch,
                 "cuda_graphs": not args.enforce_eager},
        "results": results,
        "skipped": skipped,
        "target": {"tp2_bs1_decode_speedup_min": TARGET_TP2_BS1_SPEEDUP,
                   "tp2_bs1_decode_speedup": tp2["speedup_vs_tp1"]["bs1_decode"] if tp2 and ref else None,
                   "met": bool(tp2 and ref and tp2["speedup_vs_tp1"]["bs1_decode"] >= TARGET_TP2_BS1_SPEEDUP)},
    }
    out = args.out or os.path.join(RESULTS, f"tp_bench_{name}_{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("target", "skipped")}, indent=1))
    print(f"wrote {out}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
