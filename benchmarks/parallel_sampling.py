"""Parallel sampling (n=8) on forked block tables vs its peer, 8 independent requests with the same
prompt (and the same per-sample seeds, so the very same tokens), in one run:

- KV blocks used, peak (BlockManager.num_used_blocks after every engine step), and output tok/s;
- peers: 8 independent requests with prefix caching OFF (no sharing at all) and ON (the second to
  eighth requests may hit the first one's prompt blocks once they are computed);
- the n=8 group itself with prefix caching off and on (the fork shares the prompt either way).

    # CPU (CI box): the embedded SmolLM2-135M GGUF
    .venv/bin/python benchmarks/parallel_sampling.py --device cpu
    # GPU: random weights of a config
    python benchmarks/parallel_sampling.py --device cuda --model dummy:benchmarks/configs/qwen3-0.6b.json \\
        --prompt-len 2000 --max-tokens 256

Goal: the n=8 group's peak blocks <= 1/4 of the 8 independent requests' (prefix caching off).
Writes benchmarks/results/parallel_sampling_<device>_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(llm: LLM, prompt: list[int], params: SamplingParams, grouped: bool) -> dict:
    """One n-sample run: as one group (forked) or as n independent requests. Peak blocks, tok/s."""
    eng = llm.engine
    bm = eng.core.scheduler.block_manager
    if grouped:
        eng.add_request("g", prompt, params)
        ids = ["g"]
    else:
        ids = [f"i{i}" for i in range(params.n)]
        for i, rid in enumerate(ids):
            eng.add_request(rid, prompt, params.for_child(i))
    peak, done, t0 = 0, {}, time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        peak = max(peak, bm.num_used_blocks)
    wall = time.perf_counter() - t0
    tokens = [o.token_ids for rid in ids for o in done[rid].outputs]
    n_tok = sum(len(t) for t in tokens)
    return {"peak_kv_blocks": peak, "output_tokens": n_tok, "wall_s": round(wall, 3),
            "output_tok_s": round(n_tok / wall, 1), "steps": steps, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF / HF dir / dummy:<config> (default: embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=0.25)
    # Large enough to admit all n prompts in one step, so the independent peer holds all of its
    # sequences at once (as on a GPU) and peak blocks compare footprints, not admission order.
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    common = {"model": args.model, "device": args.device, "max_model_len": args.prompt_len + args.max_tokens + 16,
                  "kv_cache_memory_gb": args.kv_cache_memory_gb, "block_size": args.block_size,
                  "max_num_batched_tokens": args.max_num_batched_tokens}
    params = SamplingParams(n=args.n, temperature=0.8, seed=2026, max_tokens=args.max_tokens, ignore_eos=True)
    results: dict[str, dict] = {}
    for caching in (False, True):
        llm = LLM(enable_prefix_caching=caching, **common)
        vocab = llm.engine.core.info.vocab_size
        prompt = [(7 + 31 * i) % (vocab - 1) + 1 for i in range(args.prompt_len)]  # fixed, no tokenizer needed
        run(llm, prompt[:32], SamplingParams(max_tokens=2), grouped=False)  # warm-up (kernels, allocator)
        llm.engine.core.scheduler.block_manager.reset_prefix_cache()
        tag = "on" if caching else "off"
        results[f"independent_x{args.n}_prefix_cache_{tag}"] = run(llm, prompt, params, grouped=False)
        llm.engine.core.scheduler.block_manager.reset_prefix_cache()
        results[f"n{args.n}_forked_prefix_cache_{tag}"] = run(llm, prompt, params, grouped=True)
        llm.engine.shutdown()
        del llm

    ref = results[f"independent_x{args.n}_prefix_cache_off"]
    same = all(r["tokens"] == ref["tokens"] for r in results.values())
    for r in results.values():
        del r["tokens"]
    fork_off = results[f"n{args.n}_forked_prefix_cache_off"]
    peer_on = results[f"independent_x{args.n}_prefix_cache_on"]
    summary = {
        "blocks_ratio_vs_independent_cache_off": round(fork_off["peak_kv_blocks"] / ref["peak_kv_blocks"], 4),
        "blocks_ratio_vs_independent_cache_on": round(fork_off["peak_kv_blocks"] / peer_on["peak_kv_blocks"], 4),
        "tok_s_ratio_vs_independent_cache_off": round(fork_off["output_tok_s"] / ref["output_tok_s"], 3),
        "tok_s_ratio_vs_independent_cache_on": round(fork_off["output_tok_s"] / peer_on["output_tok_s"], 3),
        "goal_blocks_ratio_max": 0.25,
        "identical_tokens_all_runs": same,
    }
    for name, r in results.items():
        print(f"{name:40s} peak blocks {r['peak_kv_blocks']:5d}   {r['output_tok_s']:8.1f} tok/s   "
              f"({r['output_tokens']} tokens, {r['wall_s']} s)")
    print(f"n={args.n} forked vs {args.n} independent requests (same run): peak blocks ratio "
          f"{summary['blocks_ratio_vs_independent_cache_off']} (prefix cache off), "
          f"{summary['blocks_ratio_vs_independent_cache_on']} (on); tok/s ratio "
          f"{summary['tok_s_ratio_vs_independent_cache_off']} / {summary['tok_s_ratio_vs_independent_cache_on']}; "
          f"goal <= 0.25; identical tokens: {same}")

    device = args.device.split(":")[0]
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name().split()[-1].lower()  # e.g. h200
    date = dt.date.today().isoformat()
    base = os.path.join(RESULTS, f"parallel_sampling_{device}{args.tag}_{date}")
    meta = {"model": args.model or "embedded SmolLM2-135M GGUF", "device": args.device, "n": args.n,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "block_size": args.block_size,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "host": platform.node(), "python": platform.python_version(), "date": date}
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=2)
    plot(results, summary, meta, base + ".png")
    print("wrote", base + ".json")


def plot(results: dict, summary: dict, meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = [n.replace("_prefix_cache_", "\ncache ") for n in names]
    colors = ["#888888" if n.startswith("independent") else "#2a7ab9" for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(labels, [results[n]["peak_kv_blocks"] for n in names], color=colors)
    a.set_title(f"peak KV blocks (ratio forked/independent, cache off: "
                f"{summary['blocks_ratio_vs_independent_cache_off']})")
    b.bar(labels, [results[n]["output_tok_s"] for n in names], color=colors)
    b.set_title("output tok/s")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"n={meta['n']} parallel sampling, prompt {meta['prompt_len']} tokens, "
                 f"{meta['max_tokens']} new, {meta['device']} ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
