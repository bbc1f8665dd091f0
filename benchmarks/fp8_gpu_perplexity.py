"""SmolLM2's perplexity on the GPU with fp8 weights: the kernels themselves, not their CPU twins
(docs/fp8.md, Quality).

Perplexity of the embedded SmolLM2-135M on tests/data/perplexity_text.txt (engine_core.perplexity)
with the model on CUDA in fp32, bf16, bf16 + `--quantization fp8` rounded to nearest at load time,
and bf16 + a GPTQ fp8 checkpoint written by `python -m engine_core.tools.quantize_fp8` (served as
stored). Each fp8 model runs three ways:

- w8a8: one causal forward over the whole text (~1k rows per GEMM), so every linear layer takes
  per-token activation quantization + torch._scaled_mm (the prefill path);
- weight-only: the same forward with fp8_linear.WEIGHT_ONLY_MAX_ROWS raised past the row count, so
  every GEMM is the Triton weight-only kernel (kernels/fp8_gemv.py; > 1 row: its tensor-core tile);
- decode: token by token through a paged KV cache of the model dtype (perplexity(chunk_size=1)),
  default dispatch: one row per GEMM, the weight-only kernel's one-row variant, as bs-1 decode runs.
fp32 and bf16 are measured both ways too (no-cache forward and token by token), and each row is
compared with the unquantized models on the same path.

    python benchmarks/fp8_gpu_perplexity.py --checkpoint DIR [--make-checkpoint] [--out FILE.json]

Without a CUDA GPU of compute capability >= 8.9 it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

TEST_TEXT = os.path.join(ROOT, "tests", "data", "perplexity_text.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF or HF dir (default: the embedded SmolLM2)")
    ap.add_argument("--checkpoint", default="/tmp/smollm2-fp8-gptq",
                    help="GPTQ fp8 checkpoint directory (engine_core.tools.quantize_fp8 --output)")
    ap.add_argument("--make-checkpoint", action="store_true",
                    help="run the tool (--device cuda) first when --checkpoint does not exist")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--no-decode", action="store_true", help="skip the token-by-token (chunk_size=1) rows")
    args = ap.parse_args()

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("skipped: needs a CUDA GPU with compute capability >= 8.9 (fp8 tensor cores)")
        return

    from engine_core.layers import fp8_linear
    from engine_core.loader import load_model, resolve_model
    from engine_core.perplexity import perplexity
    from engine_core.tokenizer import load_tokenizer

    source = resolve_model(args.model)
    tok = load_tokenizer(source.path)
    with open(TEST_TEXT, encoding="utf-8") as f:
        ids = tok.encode(f.read())
    print(f"{source.name}: {len(ids)} test tokens on {torch.cuda.get_device_name()}", flush=True)

    tool_s = None
    if not os.path.isdir(args.checkpoint):
        if not args.make_checkpoint:
            raise SystemExit(f"{args.checkpoint} does not exist (pass --make-checkpoint)")
        cmd = [sys.executable, "-m", "engine_core.tools.quantize_fp8", "--output", args.checkpoint, "--device", "cuda"]
        if args.model:
            cmd += ["--model", args.model]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        tool_s = time.perf_counter() - t0

    def measure(model, paths) -> dict[str, float]:
        out = {}
        for path in paths:
            if path == "decode" and args.no_decode:
                continue
            fp8_linear.WEIGHT_ONLY_MAX_ROWS = 1 << 30 if path == "weight-only" else 16
            t0 = time.perf_counter()
            out[path] = perplexity(model, ids, "cuda", chunk_size=1 if path == "decode" else None)
            torch.cuda.synchronize()
            print(f"  {path:12s} {out[path]:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        fp8_linear.WEIGHT_ONLY_MAX_ROWS = 16
        return out

    models = {
        "fp32": lambda: load_model(source, "float32", "cuda"),
        "bf16": lambda: load_model(source, "bfloat16", "cuda"),
        "fp8 round-to-nearest (load time)": lambda: load_model(source, "bfloat16", "cuda", quantization="fp8"),
        "fp8 GPTQ checkpoint": lambda: load_model(args.checkpoint, "bfloat16", "cuda", quantization="fp8"),
    }
    results: dict[str, dict[str, float]] = {}
    for name, make in models.items():
        print(name, flush=True)
        model = make()
        fp8 = "fp8" in name
        if fp8:
            n = sum(isinstance(m, fp8_linear.Fp8Linear) for m in model.modules())
            print(f"  {n} Fp8Linear layers", flush=True)
        results[name] = measure(model, ("w8a8", "weight-only", "decode") if fp8 else ("prefill", "decode"))
        del model
        torch.cuda.empty_cache()

    def ref(base: str, path: str) -> float:
        return results[base]["decode" if path == "decode" else "prefill"]

    rows = []
    print("\n| model | path | perplexity | vs fp32 | vs bf16 |\n|---|---|---:|---:|---:|")
    for name, paths in results.items():
        for path, p in paths.items():
            vs32, vs16 = 100 * (p / ref("fp32", path) - 1), 100 * (p / ref("bf16", path) - 1)
            rows.append({"model": name, "path": path, "perplexity": p, "vs_fp32_pct": vs32, "vs_bf16_pct": vs16})
            print(f"| {name} | {path} | {p:.4f} | {vs32:+.2f} % | {vs16:+.2f} % |")

    if args.out:
        info = {
            "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "model": source.name,
            "test_text": os.path.relpath(TEST_TEXT, ROOT),
            "test_tokens": len(ids),
            "checkpoint": args.checkpoint,
            "gptq_tool_seconds_cuda": tool_s,
            "paths": {
                "prefill": "perplexity(chunk_size=None): one causal forward, no KV cache (unquantized models)",
                "w8a8": "the same forward; every GEMM has > 16 rows: per-token fp8 activations + torch._scaled_mm",
                "weight-only": "the same forward with WEIGHT_ONLY_MAX_ROWS = 2**30: every GEMM is the Triton "
                               "weight-only kernel (fp8_gemv.fp8_w8a16)",
                "decode": "perplexity(chunk_size=1): token by token through a paged KV cache of the model dtype, "
                          "default dispatch (1 row: weight-only kernel); compared with fp32 / bf16 decode",
            },
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
