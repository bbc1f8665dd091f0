"""Offline GPU throughput in ONE run, same GPU, same (dummy) weights' configs (issue 6):

  1. nano-vllm's shape: 256 requests, prompt lengths U[100, 1024], output lengths U[100, 1024]
     (ignore_eos), Qwen3-0.6B and SmolLM2-135M configs: pagedserve vs HF `generate_batch`
     (transformers' continuous batching). HF's generate_batch takes one max_new_tokens for the whole
     batch, so it generates the same *total* number of output tokens with every request at the mean
     length (recorded in the JSON) — a more regular workload than ours.
  2. Llama-3.1-8B config, batch 1, 128 in / 256 out: decode tok/s vs HF `generate` and vs the
     bandwidth roofline (weight bytes / measured device copy bandwidth).
  3. Llama-3.1-8B config, batch 64 decode throughput vs HF `generate`.
  4. SmolLM2-135M config, 1,024 requests of 128 in / 128 out, max_num_seqs 256 (issue 13's third
     row): async scheduling on and off.

  --profile adds a per-step summary (issue 13) at batch 1 (8B) and at 256 running decodes
  (SmolLM2): wall time per decode step (unprofiled), GPU busy time per step (sum of kernel and
  copy times from a CUDA-only torch profiler window over the same steps), their ratio, and the
  host's time per step outside device waits — with async scheduling on and off.

    python benchmarks/offline_throughput.py --parts 1,2,3,4 --profile

Writes benchmarks/results/offline_throughput_<gpu>_<date>.json + .png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.hf_peer import hf_model_from_config
from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")
RESULTS = os.path.join(HERE, "results")
PROFILE = False  # --profile


def cfg_path(name: str) -> str:
    return os.path.join(CONFIGS, name + ".json")


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes/s): read + write of a 2 GiB buffer."""
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _, t = timed(lambda: [y.copy_(x) for _ in range(10)])
    bw = 2 * x.numel() * x.element_size() * 10 / t
    x = y = None  # release before the benchmarks
    free()
    return bw


# ---------------------------------------------------------------------------------- part 1
def part1(name: str, n: int, seed: int = 0) -> list[dict]:
    cfg = cfg_path(name)
    vocab = json.loads(Path(cfg).read_text())["vocab_size"]
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    out_lens = [rng.randint(100, 1024) for _ in range(n)]
    llm = LLM(model=f"dummy:{cfg}", dtype="bfloat16", max_model_len=2048, max_num_seqs=256,
              max_num_batched_tokens=8192, gpu_memory_utilization=0.6)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    res, el = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    toks = sum(len(r.outputs[0].token_ids) for r in res)
    ours = {"part": 1, "config": name, "engine": "pagedserve", "requests": n, "output_tokens": toks,
            "elapsed_s": el, "output_tok_s": toks / el}
    print(ours, flush=True)
    llm = res = None
    free()

    try:
        return [ours, _part1_hf(cfg, name, prompts, out_lens)]
    except Exception as e:  # noqa: BLE001 - the peer failing must not lose our numbers
        print(f"HF generate_batch failed: {e!r}", flush=True)
        return [ours, {"part": 1, "config": name, "engine": "hf_generate_batch", "error": repr(e)}]


def _part1_hf(cfg: str, name: str, prompts: list[list[int]], out_lens: list[int]) -> dict:
    from transformers import GenerationConfig

    n = len(prompts)
    model = hf_model_from_config(cfg)
    mean_out = round(sum(out_lens) / n)
    gc_ = GenerationConfig(max_new_tokens=mean_out, min_new_tokens=mean_out, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    model.generate_batch(prompts[:4], generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                         eos_token_id=None, pad_token_id=0))
    hf_res, el = timed(lambda: model.generate_batch(prompts, generation_config=gc_))
    toks = sum(len(o.generated_tokens) for o in hf_res.values())
    hf = {"part": 1, "config": name, "engine": "hf_generate_batch", "requests": n, "output_tokens": toks,
          "elapsed_s": el, "output_tok_s": toks / el, "note": f"every request at the mean output length {mean_out}"}
    print(hf, flush=True)
    model = None
    free()
    return hf


# ---------------------------------------------------------------------------------- parts 2, 3
def llama_parts(parts: set[int], profile: bool) -> list[dict]:
    cfg = cfg_path("llama-3.1-8b-instruct")
    vocab = json.loads(Path(cfg).read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    out: list[dict] = []
    bw = copy_bandwidth()
    llm = LLM(model=f"dummy:{cfg}", dtype="bfloat16", max_model_len=2048, max_num_seqs=64,
              max_num_batched_tokens=8192, gpu_memory_utilization=0.55)
    model = llm.engine.core.executor.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    roofline = bw / weight_bytes
    llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    p1 = torch.randint(100, vocab, (1, 128), generator=g).tolist()
    # Warm up on the measured shapes: a Triton kernel compiled inside the timed run would count
    # against whichever mode runs first.
    llm.generate(p1, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    if 2 in parts:
        out.append(decode_bs1(llm, p1, roofline, "pagedserve"))
        out[-1].update(copy_bandwidth_GBps=bw / 1e9, weight_bytes=weight_bytes)
    if 3 in parts:
        p = torch.randint(100, vocab, (64, 128), generator=g).tolist()
        res, el = timed(lambda: llm.generate(p, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True),
                                             use_tqdm=False))
        toks = sum(len(r.outputs[0].token_ids) for r in res)
        out.append({"part": 3, "config": "llama-3.1-8b-instruct", "engine": "pagedserve", "batch": 64,
                    "output_tok_s": toks / el})
        print(out[-1], flush=True)
    if profile:
        out.append({"part": 2, "profile": step_profiles(llm, [[7] * 128], "llama-8b batch 1")})
        out.append({"part": 2, "profile_table": profile_decode(llm, vocab)})
    if 2 in parts:  # the same decode with synchronous scheduling, for the delta
        llm.engine.core.max_in_flight = 1
        out.append(decode_bs1(llm, p1, roofline, "pagedserve_sync"))
        llm.engine.core.max_in_flight = 2
    llm = model = None
    free()

    hf = hf_model_from_config(cfg)
    for part, bs in ((2, 1), (3, 64)):
        if part not in parts:
            continue
        ids = torch.randint(100, vocab, (bs, 128), generator=g).cuda()
        kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=4, **kw)
            _, el = timed(lambda ids=ids, kw=kw: hf.generate(ids, max_new_tokens=256, min_new_tokens=256, **kw))
            _, t1 = timed(lambda ids=ids, kw=kw: hf.generate(ids, max_new_tokens=1, **kw))
        row = {"part": part, "config": "llama-3.1-8b-instruct", "engine": "hf_generate", "batch": bs,
               "output_tok_s": 256 * bs / el}
        if bs == 1:
            row.update(decode_tok_s=255 / (el - t1), roofline_tok_s=roofline,
                       pct_of_roofline=100 * (255 / (el - t1)) / roofline)
        out.append(row)
        print(row, flush=True)
    hf = None
    free()
    return out


def decode_bs1(llm: LLM, prompt: list[list[int]], roofline: float, engine: str) -> dict:
    """Batch-1 decode rate: 256 tokens, minus the prefill step (timed separately)."""
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    _, el = timed(lambda: llm.generate(prompt, params, use_tqdm=False))
    _, t_prefill = timed(lambda: llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False))
    decode = 255 / (el - t_prefill)
    row = {"part": 2, "config": "llama-3.1-8b-instruct", "engine": engine, "batch": 1, "output_tok_s": 256 / el,
           "decode_tok_s": decode, "roofline_tok_s": roofline, "pct_of_roofline": 100 * decode / roofline,
           "async_scheduling": llm.engine.core.max_in_flight > 1}
    print(row, flush=True)
    return row


# ---------------------------------------------------------------------------------- part 4
def part4(n: int = 1024) -> list[dict]:
    cfg = cfg_path("smollm2-135m-instruct")
    vocab = json.loads(Path(cfg).read_text())["vocab_size"]
    rng = random.Random(4)

    def fresh(k: int) -> list[list[int]]:  # new random prompts: no prefix-cache hit on an earlier run's
        return [[rng.randrange(100, vocab) for _ in range(128)] for _ in range(k)]

    llm = LLM(model=f"dummy:{cfg}", dtype="bfloat16", max_model_len=1024, max_num_seqs=256,
              max_num_batched_tokens=8192, gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    # Warm up on the measured shapes (prefill chunks, mixed steps, every decode batch size).
    llm.generate(fresh(512), params, use_tqdm=False)
    rows = []
    for async_on in (True, False):
        llm.engine.core.max_in_flight = 2 if async_on else 1
        prompts = fresh(n)
        res, el = timed(lambda prompts=prompts: llm.generate(prompts, params, use_tqdm=False))
        toks = sum(len(r.outputs[0].token_ids) for r in res)
        rows.append({"part": 4, "config": "smollm2-135m-instruct", "engine": "pagedserve" if async_on else
                     "pagedserve_sync", "requests": n, "output_tokens": toks, "elapsed_s": el,
                     "output_tok_s": toks / el, "async_scheduling": async_on})
        print(rows[-1], flush=True)
    if PROFILE:
        rows.append({"part": 4, "profile": step_profiles(llm, fresh(256), "smollm2 256 running")})
    llm = None
    free()
    return rows


@contextlib.contextmanager
def _timed_calls(targets: list[tuple[object, str]]):
    """Accumulate the wall time of the named methods while the block runs (host breakdown)."""
    totals: dict[str, float] = {}
    for obj, name in targets:
        fn = getattr(obj, name)

        def timed_fn(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed_fn)
    try:
        yield totals
    finally:
        for obj, name in targets:
            delattr(obj, name)  # back to the class's method


def step_profiles(llm: LLM, prompts: list[list[int]], label: str, warm: int = 12, steps: int = 40) -> list[dict]:
    """GPU busy / wall per decode step, async scheduling on and off (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    core = eng.core
    runner = core.executor.runner
    out = []
    for async_on in (True, False):
        core.max_in_flight = 2 if async_on else 1
        params = SamplingParams(temperature=0, max_tokens=warm + 2 * steps + 8, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"prof-{async_on}-{i}", p, params)
        for _ in range(warm):  # prefills done, every request decoding
            eng.step()
        torch.cuda.synchronize()
        st0 = dataclasses.replace(runner.stats)
        with _timed_calls([(core.scheduler, "schedule"), (core.scheduler, "update_from_output"),
                           (core.executor, "submit"), (core.executor, "get_result")]) as calls:
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / steps
        st1 = dataclasses.replace(runner.stats)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
        gpu_us = sum(e.self_device_time_total for e in prof.key_averages())
        while eng.has_unfinished_requests():
            eng.step()
        n = max(1, st1.steps - st0.steps)
        row = {"label": label, "async_scheduling": async_on, "running": len(prompts),
               "wall_ms_per_step": 1e3 * wall, "gpu_busy_ms_per_step": gpu_us / 1e3 / steps,
               "gpu_busy_over_wall": (gpu_us / 1e6 / steps) / wall,
               "host_ms_per_step": 1e3 * (wall - (st1.wait_s - st0.wait_s) / n),
               "submit_ms_per_step": 1e3 * (st1.submit_s - st0.submit_s) / n,
               "host_breakdown_ms_per_step": {k: 1e3 * v / steps for k, v in calls.items()}}
        print(row, flush=True)
        out.append(row)
    core.max_in_flight = 2
    return out


def profile_decode(llm: LLM, vocab: int) -> str:
    """torch profiler over bs1 decode steps: where the time goes (kernels, launch gaps, host)."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    eng.add_request("prof", [7] * 128, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(8):
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    print(table)
    print(cpu)
    return table + "\n" + cpu


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "output_tok_s" in r]
    groups = sorted({(r["part"], r["config"], r.get("batch", r.get("requests"))) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.8))
    for ax, (part, cfg, b) in zip(axes if len(groups) > 1 else [axes], groups):
        sel = [r for r in rows if (r["part"], r["config"], r.get("batch", r.get("requests"))) == (part, cfg, b)]
        ax.bar([r["engine"] for r in sel], [r["output_tok_s"] for r in sel],
               color=["#3b7dd8" if r["engine"] == "pagedserve" else "#999" for r in sel])
        ax.set_title(f"part {part}: {cfg}\n{'batch' if part > 1 else 'requests'} {b}", fontsize=8)
        ax.set_ylabel("output tok/s")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--part1-configs", default="qwen3-0.6b,smollm2-135m-instruct")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    global PROFILE
    PROFILE = args.profile
    rows: list[dict] = []
    if 1 in parts:
        for name in args.part1_configs.split(","):
            rows += part1(name, args.num_requests)
    if parts & {2, 3}:
        rows += llama_parts(parts, args.profile)
    if 4 in parts:
        rows += part4()

    print(f"\n{'part':<6} {'config':<24} {'engine':<20} {'out tok/s':>12}")
    ratios = {}
    for r in rows:
        if "output_tok_s" in r:
            print(f"{r['part']:<6d} {r['config']:<24} {r['engine']:<20} {r['output_tok_s']:>12.1f}")
    for part in sorted(parts):
        for cfg in sorted({r["config"] for r in rows if r.get("part") == part and "config" in r}):
            ours = [r for r in rows if r.get("part") == part and r.get("config") == cfg and r["engine"] == "pagedserve"]
            peer = [r for r in rows if r.get("part") == part and r.get("config") == cfg
                    and r["engine"] not in ("pagedserve", "pagedserve_sync")]
            if ours and peer:
                ratios[f"part{part}_{cfg}"] = ours[0]["output_tok_s"] / peer[0]["output_tok_s"]
    for k, v in ratios.items():
        print(f"pagedserve / HF {k}: {v:.2f}x")
    for r in rows:
        for pr in r.get("profile") or []:
            print(f"profile {pr['label']:<22} async={pr['async_scheduling']!s:<5} wall {pr['wall_ms_per_step']:.2f} ms/step, "
                  f"GPU busy {pr['gpu_busy_ms_per_step']:.2f} ms ({pr['gpu_busy_over_wall']:.2f} of wall), "
                  f"host {pr['host_ms_per_step']:.2f} ms/step (submit {pr['submit_ms_per_step']:.2f}); "
                  f"{ {k: round(v, 2) for k, v in pr['host_breakdown_ms_per_step'].items()} }")
    for r in rows:
        if "pct_of_roofline" in r:
            print(f"{r['engine']} bs1 decode {r['decode_tok_s']:.1f} tok/s = {r['pct_of_roofline']:.1f}% of "
                  f"roofline {r['roofline_tok_s']:.1f} tok/s")

    date = dt.date.today().isoformat()
    gpu = torch.cuda.get_device_name()
    meta = {"date": date, "device": gpu, "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
            "weights": "dummy (random), bf16"}
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"offline_throughput_{gpu.split()[1].lower() if ' ' in gpu else 'gpu'}"
                        f"{args.tag}_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows, "ratios": ratios}, f, indent=2)
    plot(rows, base + ".png", f"pagedserve vs HF transformers on {gpu} — {date}")
    print(f"wrote {base}.json")


if __name__ == "__main__":
    main()
