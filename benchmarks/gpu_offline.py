"""Offline GPU throughput: pagedserve vs HF transformers `generate`, same dummy weights' config,
same device, same run. Random ("dummy") weights: no hub downloads; config values are the real ones
under benchmarks/configs/.

    python benchmarks/gpu_offline.py --config benchmarks/configs/llama-3.1-8b-instruct.json

Cases: bs=1 decode (1 request) and a batch (default 64 requests), --input-len in / --output-len out,
output length forced (ignore_eos / min_new_tokens). Writes benchmarks/results/gpu_offline_<name>_<date>.json/.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.hf_peer import hf_model_from_config
from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return torch.randint(100, vocab, (n, length), generator=torch.Generator().manual_seed(0)).tolist()


def run_pagedserve(cfg: str, batches: list[int], ps, output_len: int, enforce_eager: bool,
                   gpu_memory_utilization: float) -> list[dict]:
    llm = LLM(model=f"dummy:{cfg}", dtype="bfloat16", max_model_len=4096, max_num_seqs=max(batches),
              enforce_eager=enforce_eager, max_num_batched_tokens=8192,
              gpu_memory_utilization=gpu_memory_utilization)
    info = llm.engine.core.info
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(ps[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    out = []
    for bs in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = llm.generate(ps[:bs], params, use_tqdm=False)
        torch.cuda.synchronize()
        el = time.perf_counter() - t0
        n = sum(len(r.outputs[0].token_ids) for r in res)
        out.append({"engine": "pagedserve" + (" (eager)" if enforce_eager else " (cuda graphs)"), "batch": bs,
                    "output_tokens": n, "elapsed_s": el, "output_tok_s": n / el,
                    "num_kv_blocks": info.num_kv_blocks})
        print(out[-1], flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_hf(cfg: str, batches: list[int], ps, output_len: int) -> list[dict]:
    model = hf_model_from_config(cfg)
    out = []
    with torch.inference_mode():
        ids = torch.tensor(ps[:2], device="cuda")
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        for bs in batches:
            ids = torch.tensor(ps[:bs], device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            el = time.perf_counter() - t0
            n = (gen.shape[1] - ids.shape[1]) * bs
            out.append({"engine": "hf_transformers_generate", "batch": bs, "output_tokens": n,
                        "elapsed_s": el, "output_tok_s": n / el})
            print(out[-1], flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="benchmarks/configs/smollm2-135m-instruct.json")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="leaves room for the HF peer in the same process")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    ps = prompts(max(batches), args.input_len, vocab)

    results = run_pagedserve(args.config, batches, ps, args.output_len, False, args.gpu_memory_utilization)
    if not args.skip_eager:
        results += run_pagedserve(args.config, batches, ps, args.output_len, True, args.gpu_memory_utilization)
    results += run_hf(args.config, batches, ps, args.output_len)

    name = os.path.splitext(os.path.basename(args.config))[0]
    ours = {r["batch"]: r for r in results if r["engine"] == "pagedserve (cuda graphs)"}
    hf = {r["batch"]: r for r in results if r["engine"] == "hf_transformers_generate"}
    ratios = {f"bs{b}": ours[b]["output_tok_s"] / hf[b]["output_tok_s"] for b in batches}
    print(f"\n{name}: {args.input_len} in / {args.output_len} out, bf16, {torch.cuda.get_device_name()}")
    print(f"{'engine':<28} {'batch':>6} {'out tok/s':>12}")
    for r in results:
        print(f"{r['engine']:<28} {r['batch']:>6d} {r['output_tok_s']:>12.1f}")
    for k, v in ratios.items():
        print(f"pagedserve / HF transformers at {k}: {v:.2f}x")

    date = dt.date.today().isoformat()
    meta = {"date": date, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": " ".join(["python"] + sys.argv), "config": args.config, "weights": "dummy (random)",
            "dtype": "bfloat16", "args": vars(args)}
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"gpu_offline_{name}_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "ratios": ratios}, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4))
        for ax, b in zip(axes if len(batches) > 1 else [axes], batches):
            rows = [r for r in results if r["batch"] == b]
            ax.bar([r["engine"].replace(" ", "\n", 1) for r in rows], [r["output_tok_s"] for r in rows],
                   color=["#3b7dd8" if r["engine"].startswith("pagedserve") else "#999" for r in rows])
            ax.set_title(f"batch {b}")
            ax.set_ylabel("output tok/s")
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"{name} (dummy weights, bf16) on {meta['device']}, {args.input_len} in / "
                     f"{args.output_len} out — {date}", fontsize=9)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=110)
    except ImportError:
        print("matplotlib missing: no PNG")
    print(f"wrote {base}.json")


if __name__ == "__main__":
    main()
