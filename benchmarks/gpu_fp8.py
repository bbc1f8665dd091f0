"""FP8 weights + activations (`--quantization fp8`) vs bf16 on a Hopper GPU, same dummy-weight
config, same run: bs=1 decode tok/s (CUDA graphs) and how far fp8's logits move from bf16's.

    python benchmarks/gpu_fp8.py --config benchmarks/configs/llama-3.1-8b-instruct.json

bs1 decode is bound by the bytes of weights read per token, so fp8 (1 byte per weight) should
approach 2x bf16. Random ("dummy") weights: quality is reported as the relative error of fp8's
logits against bf16's on the same prompt and the share of positions with the same argmax (on
real weights the CPU perplexity tests bound int8/int4; the device has no GGUF reader).
Writes benchmarks/results/gpu_fp8_<name>_<date>.json.
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

from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@torch.inference_mode()
def prompt_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prompt, no KV cache (the model's causal path)."""
    runner = llm.engine.core.executor.runner
    dev, n = runner.device, len(ids)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev), block_size=16,
        max_query_len=n, max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n], num_decodes=0)
    hidden = runner.model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), None, md)
    return runner.model.compute_logits(hidden).float()


def run(cfg: str, quantization: str | None, prompt: list[int], output_len: int,
        batch_sizes: list[int], kv_cache_dtype: str = "auto") -> tuple[dict, torch.Tensor]:
    llm = LLM(model=f"dummy:{cfg}", dtype="bfloat16", max_model_len=2048, max_num_seqs=max(8, *batch_sizes),
              quantization=quantization, gpu_memory_utilization=0.4, kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # Warm-up: the whole timed workload once, so no Triton compile (a fresh cache) lands in a timing.
    for bs in batch_sizes:
        llm.generate([prompt] * bs, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                     use_tqdm=False)
    res = {"quantization": quantization or "none (bf16)", "kv_cache_dtype": kv_cache_dtype}
    for bs in batch_sizes:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm.generate([prompt] * bs, params, use_tqdm=False)
        torch.cuda.synchronize()
        el = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in out)
        key = "" if bs == 1 else f"_bs{bs}"
        res.update({f"output_tokens{key}": n, f"elapsed_s{key}": el, f"decode_tok_s{key}": n / el})
    ex = llm.engine.core.executor
    res["weight_bytes"] = ex.weight_bytes
    res["num_kv_blocks"] = ex.describe().num_kv_blocks
    logits = prompt_logits(llm, prompt).cpu()
    print(res, flush=True)
    del llm, ex
    gc.collect()
    torch.cuda.empty_cache()
    return res, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="benchmarks/configs/llama-3.1-8b-instruct.json")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,16", help="decode batch sizes (1 is the headline)")
    ap.add_argument("--disable-pdl", action="store_true",
                    help="launch the Triton kernels without programmatic dependent launch (A/B of kernels.pdl_enabled)")
    args = ap.parse_args()
    if args.disable_pdl:
        from engine_core import kernels
        kernels._pdl_enabled = lambda index: False
    bss = [int(b) for b in args.batch_sizes.split(",")]
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    prompt = torch.randint(100, vocab, (args.input_len,), generator=torch.Generator().manual_seed(0)).tolist()
    bf16, ref = run(args.config, None, prompt, args.output_len, bss)
    fp8, got = run(args.config, "fp8", prompt, args.output_len, bss)
    fp8kv, _ = run(args.config, "fp8", prompt, args.output_len, bss, kv_cache_dtype="fp8")
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ratio = fp8["decode_tok_s"] / bf16["decode_tok_s"]
    name = os.path.splitext(os.path.basename(args.config))[0]
    print(f"\n{name} bs1 {args.input_len} in / {args.output_len} out on {torch.cuda.get_device_name()}: "
          f"bf16 {bf16['decode_tok_s']:.1f} tok/s, fp8 {fp8['decode_tok_s']:.1f} tok/s = {ratio:.2f}x; "
          f"weights {bf16['weight_bytes'] / 2**30:.2f} -> {fp8['weight_bytes'] / 2**30:.2f} GiB; "
          f"logits rel. error {rel:.4f}, argmax agreement {agree:.3f}")
    print(f"fp8 weights + fp8 KV cache: {fp8kv['decode_tok_s']:.1f} tok/s bs1, KV blocks "
          f"{fp8['num_kv_blocks']} -> {fp8kv['num_kv_blocks']} in the same memory")
    for bs in bss[1:]:
        print(f"bs{bs}: bf16 {bf16[f'decode_tok_s_bs{bs}']:.1f} tok/s, fp8 {fp8[f'decode_tok_s_bs{bs}']:.1f} tok/s "
              f"= {fp8[f'decode_tok_s_bs{bs}'] / bf16[f'decode_tok_s_bs{bs}']:.2f}x")
    date = dt.date.today().isoformat()
    meta = {"date": date, "device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv),
            "torch": torch.__version__, "config": args.config, "args": vars(args)}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(os.environ.get("OUT", RESULTS), f"gpu_fp8_{name}{'_nopdl' if args.disable_pdl else ''}_{date}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [bf16, fp8, fp8kv], "fp8_over_bf16": ratio,
                   "logits_rel_error": rel, "argmax_agreement": agree}, f, indent=2)
    print(f"wrote {path}")
    plot(path)


def plot(json_path: str) -> None:
    """Decode tok/s per batch size, bf16 vs fp8, next to the JSON (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    bf16, fp8 = data["results"][:2]
    bss = [int(b) for b in data["meta"]["args"]["batch_sizes"].split(",")]
    keys = ["decode_tok_s" if b == 1 else f"decode_tok_s_bs{b}" for b in bss]
    fig, axes = plt.subplots(1, len(bss), figsize=(3.2 * len(bss), 3.4))
    for ax, b, k in zip(axes if len(bss) > 1 else [axes], bss, keys):
        vals = [bf16[k], fp8[k]]
        ax.bar(["bf16", "fp8"], vals, color=["#888", "#2a7"])
        ax.set_title(f"batch {b}: fp8 = {vals[1] / vals[0]:.2f}x")
        ax.set_ylabel("decode tok/s")
    m = data["meta"]
    fig.suptitle(f"{os.path.basename(m['config'])} on {m['device']} ({m['date']})", fontsize=9)
    fig.tight_layout()
    out = json_path[:-5] + ".png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--plot":
    plot(sys.argv[2])
elif __name__ == "__main__":
    main()
