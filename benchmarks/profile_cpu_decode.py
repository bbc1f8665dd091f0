"""Where a single-stream CPU decode step goes: wall time per step split into the model forward
(and, with --ops, the forward per aten op via torch.profiler), the model runner's input building,
logits + sampling, and everything else (scheduler, EngineCore, output processing).

    .venv/bin/python benchmarks/profile_cpu_decode.py --variant int4 --threads 2 --tokens 64 [--ops]

The stages are timed by wrapping the runner's methods from outside (no engine code changes), so the
numbers include the wrappers' ~1 us each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.cpu_resources import set_openmp_wait_policy

# Before torch loads libgomp; both engines (llama.cpp's ggml uses OpenMP too) run under it.
OMP_POLICY = set_openmp_wait_policy()

import torch

from benchmarks.offline_cpu import VARIANTS, make_prompt
from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams


def find_runner(llm: LLM):
    ex = llm.engine.engine_core.executor if hasattr(llm.engine, "engine_core") else llm.engine.core.executor
    for attr in ("runner", "model_runner", "worker"):
        if hasattr(ex, attr):
            return getattr(ex, attr)
    raise RuntimeError(f"no model runner on {ex!r}")


def wrap(obj, name: str, acc: dict[str, float]) -> None:
    fn = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[name] += time.perf_counter() - t

    setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="int4", choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--ops", action="store_true", help="also a torch.profiler table of the forward's ops")
    ap.add_argument("--extra", default="", help="extra LLM kwargs, k=v,k=v")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(VARIANTS[args.variant])
    for kv in filter(None, args.extra.split(",")):
        k, v = kv.split("=")
        kw[k] = {"true": True, "false": False}.get(v, v)
    t0 = time.perf_counter()
    llm = LLM(max_model_len=512, max_num_seqs=16, kv_cache_memory_gb=0.5, cpu_threads=args.threads, **kw)
    print(f"engine start {time.perf_counter() - t0:.2f}s", flush=True)
    t0 = time.perf_counter()
    llm.generate([[100] * 16], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    print(f"warm-up generate {time.perf_counter() - t0:.2f}s", flush=True)
    runner = find_runner(llm)
    acc: dict[str, float] = defaultdict(float)
    for name in ("_prepare_inputs", "_forward", "_sample_step", "_sampling_metadata"):
        wrap(runner, name, acc)
    wrap(runner.batch, "prepare", acc)
    wrap(runner.model, "compute_logits", acc)
    eng = llm.engine
    prompt = make_prompt(args.prompt_len, runner.vocab_size, 1)
    eng.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True))
    while True:  # prefill until the first token
        outs = eng.step()
        if any(o.outputs[0].token_ids for o in outs):
            break
    acc.clear()
    steps, t0 = 0, time.perf_counter()
    prof = None
    if args.ops:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    per = lambda s: 1e3 * s / args.tokens
    fwd, prep, samp = acc["_forward"], acc["_prepare_inputs"] + acc["prepare"], acc["_sample_step"]
    logits, smd = acc["compute_logits"], acc["_sampling_metadata"]
    print(f"{args.variant}, {args.threads} threads, {args.tokens} tokens in {steps} engine steps: "
          f"{args.tokens / wall:.1f} tok/s, {per(wall):.2f} ms/token "
          f"(load average {os.getloadavg()[0]:.1f})")
    for label, v in [("model forward", fwd), ("LM head (compute_logits)", logits),
                     ("input building (batch.prepare + _prepare_inputs)", prep),
                     ("sampling metadata", smd), ("sampler (_sample_step)", samp),
                     ("scheduler + EngineCore + rest", wall - fwd - prep - samp - logits - smd)]:
        print(f"  {label:<50} {per(v):7.3f} ms  {100 * v / wall:5.1f} %")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
