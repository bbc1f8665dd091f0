"""Offline throughput on CPU: pagedserve vs HF transformers `generate` (batched) vs llama.cpp
(llama-cpp-python, single stream), all on the embedded SmolLM2-135M, measured in the same run.

    .venv/bin/python benchmarks/offline_cpu.py [--num-requests 32] [--input-len 128] [--output-len 128]

Writes benchmarks/results/offline_cpu_<date>.json and .png. Output tokens are forced to
--output-len (ignore_eos / min_new_tokens) so every engine does the same work.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.llm import LLM
from engine_core.loader.model_source import resolve_model
from engine_core.sampling_params import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids (special tokens) so prompts are ordinary text tokens.
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def bench_pagedserve(prompts, output_len: int, concurrency: int, dtype: str) -> dict:
    llm = LLM(max_model_len=1024, max_num_seqs=concurrency, kv_cache_memory_gb=1.0, dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "pagedserve", "dtype": dtype, "concurrency": concurrency, "requests": len(prompts),
            "output_tokens": n_out, "elapsed_s": elapsed, "output_tok_s": n_out / elapsed}


def bench_hf(prompts, output_len: int, gguf: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    with torch.inference_mode():
        model.generate(ids[:2], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - t0
    n_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"engine": "hf_transformers_generate", "concurrency": len(prompts), "requests": len(prompts),
            "output_tokens": n_out, "elapsed_s": elapsed, "output_tok_s": n_out / elapsed}


def bench_llama_cpp(prompts, output_len: int, gguf: str, n_requests: int) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"engine": "llama.cpp", "error": "llama-cpp-python not installed (make bench installs it)"}
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
    for i, _ in enumerate(llm.generate(prompts[0][:16], temp=0.0, reset=True)):  # warm-up
        if i == 8:
            break
    total, elapsed = 0, 0.0
    for prompt in prompts[:n_requests]:
        llm.reset()
        t0 = time.perf_counter()
        n = 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            n += 1
            if n == output_len:
                break
        elapsed += time.perf_counter() - t0
        total += n
    return {"engine": "llama.cpp (llama-cpp-python)", "concurrency": 1, "requests": n_requests,
            "output_tokens": total, "elapsed_s": elapsed, "output_tok_s": total / elapsed}


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "output_tok_s" in r]
    labels = [f"{r['engine']} {r.get('dtype', '')}\n(concurrency {r['concurrency']})" for r in ok]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(labels, [r["output_tok_s"] for r in ok], color=["#3b7dd8" if r["engine"] == "pagedserve" else "#999" for r in ok])
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=9)
    plt.xticks(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--llama-cpp-requests", type=int, default=4, help="single-stream requests timed for llama.cpp")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="pagedserve weight/activation dtypes to run (float32 is the CPU default; bfloat16 "
                         "halves the weight bytes each decode step reads)")
    args = ap.parse_args()

    source = resolve_model(None)
    prompts = make_prompts(args.num_requests, args.input_len, source.config.vocab_size)
    results = []
    for dtype in args.dtypes.split(","):
        for conc in sorted({16, args.num_requests}):
            results.append(bench_pagedserve(prompts[:conc], args.output_len, conc, dtype))
            print(results[-1], flush=True)
    if not args.skip_hf:
        results.append(bench_hf(prompts, args.output_len, source.path))
        print(results[-1], flush=True)
    results.append(bench_llama_cpp(prompts, args.output_len, source.path, args.llama_cpp_requests))
    print(results[-1], flush=True)

    peers = [r for r in results if r["engine"] != "pagedserve" and "output_tok_s" in r]
    ratios = {f"pagedserve {r['dtype']} (concurrency {r['concurrency']}) / {p['engine']}":
              r["output_tok_s"] / p["output_tok_s"] for r in results if r["engine"] == "pagedserve" for p in peers}
    print(f"\n{'engine':<34} {'dtype':>9} {'concurrency':>12} {'out tok/s':>10}")
    for r in results:
        if "output_tok_s" in r:
            print(f"{r['engine']:<34} {r.get('dtype', ''):>9} {r['concurrency']:>12d} {r['output_tok_s']:>10.1f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")

    date = dt.date.today().isoformat()
    meta = {"date": date, "device": f"cpu ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)", "command": " ".join(["python"] + sys.argv),
            "model": source.name, "torch": torch.__version__, "args": vars(args)}
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"offline_cpu_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "ratios": ratios}, f, indent=2)
    plot(results, base + ".png", f"SmolLM2-135M on CPU, {args.num_requests} requests, "
         f"{args.input_len} in / {args.output_len} out — {date}")
    print(f"wrote {base}.json and .png")


if __name__ == "__main__":
    main()
