"""Where a GPU decode step goes, per kernel: torch.profiler (CUDA activity, kernels inside CUDA-graph
replays included) over a steady single-stream decode, grouped by kernel name, per step.

    python benchmarks/profile_gpu_decode.py --config benchmarks/configs/llama-3.1-8b-instruct.json \
        --quantization fp8 [--batch-size 1] [--steps 64]

Prints the step's wall time, the GPU busy time inside it (sum of kernel durations) and the top
kernels by time per step, so "the GEMMs" vs "the small kernels" vs "idle between kernels" is measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="benchmarks/configs/llama-3.1-8b-instruct.json")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)  # each phase; max_tokens covers all three
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--host-profile", action="store_true", help="also cProfile the host side of the steps")
    ap.add_argument("--disable-pdl", action="store_true", help="no programmatic dependent launch (A/B)")
    args = ap.parse_args()
    if args.disable_pdl:
        from engine_core import kernels
        kernels._pdl_enabled = lambda index: False
    llm = LLM(model=f"dummy:{args.config}", dtype="bfloat16", max_model_len=2048, max_num_seqs=max(8, args.batch_size),
              quantization=args.quantization, gpu_memory_utilization=0.4)
    llm.generate([[100] * 16], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    eng = llm.engine
    for i in range(args.batch_size):
        eng.add_request(f"r{i}", [100 + i] * 128, SamplingParams(temperature=0, max_tokens=3 * args.steps + 64,
                                                                   ignore_eos=True))
    for _ in range(16):  # prefill, then a few plain decode steps
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t0) / args.steps
    if args.host_profile:  # where the host's time per step goes (the GPU idles if it exceeds the kernels')
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            eng.step()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    per_kernel: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            per_kernel[ev.name] += ev.device_time  # us
            count[ev.name] += 1
    busy = sum(per_kernel.values()) / args.steps
    print(f"{args.quantization or 'bf16'} bs{args.batch_size}: step {plain * 1e3:.3f} ms wall "
          f"({wall * 1e3:.3f} ms under the profiler), "
          f"GPU kernels {busy / 1e3:.3f} ms/step ({sum(count.values()) / args.steps:.0f} kernels/step)")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {us / args.steps:8.1f} us/step  {count[name] / args.steps:6.1f}x  {name[:110]}")


if __name__ == "__main__":
    main()
