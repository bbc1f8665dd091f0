"""The seed demo: a naive Hugging Face server (benchmarks/baselines/hf_server.py: `generate`, one
request at a time) against pagedserve (`pagedserve serve`: the gRPC stack behind the OpenAI gateway),
same model, same device, same requests, driven over HTTP by `pagedserve bench serve` at each
concurrency level. The servers run one after the other, never together.

    # CPU, the embedded SmolLM2 (real weights):
    python benchmarks/seed_demo.py --device cpu --output-len 64
    # GPU, random weights for a config:
    python benchmarks/seed_demo.py --device cuda --dummy-config benchmarks/configs/smollm2-135m-instruct.json
    python benchmarks/seed_demo.py --device cuda --dummy-config benchmarks/configs/llama-3.1-8b-instruct.json

Per level (default 1,4,16,64) the bench sends max(--min-prompts, level x --prompts-per-level)
requests (bounded: the naive server serves them one by one) of --input-len random tokens and
exactly --output-len output tokens (ignore_eos), after --num-warmups warm-up requests.
Prints a side-by-side table (output tok/s, TTFT p50/p99, TPOT p50) and writes
benchmarks/results/seed_demo_<device>_<model>_<date>.json and .png (device, date and command in the
JSON's meta; the markdown table too, ready for the README). With --dummy-config both servers get
the embedded SmolLM2 tokenizer (random-weight models have none); a model whose vocabulary is larger
than that tokenizer's (Llama-3.1-8B) samples ids that decode to no text - both servers then stream
fewer text chunks (TTFT is taken at the first chunk with text), while the token counts come from
the usage and stay exact.

Rough run time of the naive side: sum(prompts) x output-len / (its single-stream tok/s): with the
defaults 88 requests x 128 tokens; ~17 tok/s on 2 CPU cores (use --output-len 32 there), a few
minutes for SmolLM2 on a GPU; --max-prompts caps each level.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import serve_bench
from benchmarks.servers import start_hf_server, start_pagedserve

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ENGINES = ("hf_baseline", "pagedserve")
LABELS = {"hf_baseline": "naive HF server (generate, one at a time)", "pagedserve": "pagedserve"}
KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "request_goodput", "good_requests", "max_concurrency",
        "num_prompts", "usage_reported", "errors")


def gpu_name() -> str | None:
    """Without initialising CUDA in this process (the servers need the memory)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def describe_device(device: str) -> tuple[str, str]:
    """(human description, short slug for file names)."""
    if device.startswith("cuda"):
        name = gpu_name() or "CUDA GPU"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
        return name, slug or "cuda"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "cpu"


def prompts_for(level: int, args: argparse.Namespace) -> int:
    """max(--min-prompts, level x --prompts-per-level), capped by --max-prompts but never below the
    level itself (fewer requests than the concurrency would not load the server at that level)."""
    n = max(args.min_prompts, level * args.prompts_per_level)
    return max(level, min(n, args.max_prompts)) if args.max_prompts else n


def run_engine(engine: str, args: argparse.Namespace, levels: list[int], device: str, log_dir: str) -> list[dict]:
    max_len = max(256, args.input_len + args.output_len + 64)
    if engine == "hf_baseline":
        extra = ["--max-model-len", str(max_len)]
        if args.server_tokenizer:
            extra += ["--tokenizer", args.server_tokenizer]
        if args.dtype != "auto":
            extra += ["--dtype", args.dtype]
        extra += shlex.split(args.baseline_args)
        server = start_hf_server(model=args.model, dummy_config=args.dummy_config, device=device, extra=extra,
                                 log_path=os.path.join(log_dir, "hf_server.log"))
    else:
        model = f"dummy:{args.dummy_config}" if args.dummy_config else args.model
        extra = ["--max-model-len", str(max_len), "--max-num-seqs", str(max(max(levels), 1)), "--quiet"]
        if args.server_tokenizer:
            extra += ["--tokenizer", args.server_tokenizer]
        elif args.dummy_config:
            from engine_core.loader.model_source import embedded_gguf_path

            extra += ["--tokenizer", embedded_gguf_path()]
        if args.dtype != "auto":
            extra += ["--dtype", args.dtype]
        if device == "cpu":
            extra += ["--kv-cache-memory-gb", str(args.cpu_kv_cache_gb)]
        extra += shlex.split(args.pagedserve_args)
        server = start_pagedserve(model, device=device, extra=extra, log_path=os.path.join(log_dir, "pagedserve.log"))
    print(f"\n### {LABELS[engine]}: starting ({' '.join(server.argv[1:])})", flush=True)
    runs = []
    try:
        url = server.wait_ready(args.startup_timeout)
        print(f"### {engine} ready at {url}", flush=True)
        for level in levels:
            bargs = serve_bench.bench_args(
                base_url=url, endpoint=args.endpoint, dataset_name="random", input_len=args.input_len,
                output_len=args.output_len, range_ratio=args.range_ratio, num_prompts=prompts_for(level, args),
                max_concurrency=str(level), num_warmups=args.num_warmups, seed=args.seed,
                goodput=args.goodput, disable_tqdm=args.disable_tqdm, tokenizer=args.tokenizer)
            print(f"### {engine}: concurrency {level}, {bargs.num_prompts} requests", flush=True)
            out = serve_bench.run_benchmark(bargs)
            m = out["runs"][0]
            runs.append({k: m.get(k) for k in KEEP} | {k: v for k, v in m.items() if k.endswith("_ms")})
            if m["failed"]:
                print(f"!!! {m['failed']} requests failed: {m['errors'][:3]}", flush=True)
    finally:
        rc = server.stop()
        print(f"### {engine} stopped (exit code {rc}); log: {server.name} -> {log_dir}", flush=True)
    return runs


def table(results: dict[str, list[dict]], levels: list[int]) -> str:
    """Markdown: per concurrency level, both servers side by side."""
    lines = [("| concurrency | naive HF tok/s | pagedserve tok/s | speed-up | naive TTFT p50 / p99 (ms) "
              "| pagedserve TTFT p50 / p99 (ms) | naive TPOT p50 (ms) | pagedserve TPOT p50 (ms) |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    hf = {r["max_concurrency"]: r for r in results.get("hf_baseline", [])}
    ps = {r["max_concurrency"]: r for r in results.get("pagedserve", [])}

    def cell(r: dict | None, fmt) -> str:
        return fmt(r) if r else "n/a"

    for c in levels:
        a, b = hf.get(c), ps.get(c)
        speed = f"{b['output_throughput'] / a['output_throughput']:.1f}x" if a and b and a["output_throughput"] else "n/a"
        cells = [str(c), cell(a, lambda r: f"{r['output_throughput']:.1f}"),
                 cell(b, lambda r: f"{r['output_throughput']:.1f}"), speed,
                 cell(a, lambda r: f"{r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}"),
                 cell(b, lambda r: f"{r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}"),
                 cell(a, lambda r: f"{r['p50_tpot_ms']:.1f}"), cell(b, lambda r: f"{r['p50_tpot_ms']:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hf_baseline": "#999999", "pagedserve": "#3b7dd8"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for engine, runs in results.items():
        if not runs:
            continue
        x = [r["max_concurrency"] for r in runs]
        c = colors[engine]
        axes[0].plot(x, [r["output_throughput"] for r in runs], "o-", color=c, label=LABELS[engine])
        axes[1].plot(x, [r["p50_ttft_ms"] for r in runs], "o-", color=c, label=f"{engine} p50")
        axes[1].plot(x, [r["p99_ttft_ms"] for r in runs], "s--", color=c, alpha=0.7, label=f"{engine} p99")
        axes[2].plot(x, [r["p50_tpot_ms"] for r in runs], "o-", color=c, label=f"{engine} p50")
        axes[2].plot(x, [r["p99_tpot_ms"] for r in runs], "s--", color=c, alpha=0.7, label=f"{engine} p99")
    for ax, t, y in ((axes[0], "output throughput", "tokens / s"), (axes[1], "time to first token", "ms (log)"),
                     (axes[2], "time per output token", "ms (log)")):
        ax.set_title(t)
        ax.set_ylabel(y)
        ax.set_xlabel("concurrent users (max concurrency)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({r["max_concurrency"] for runs in results.values() for r in runs})
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_title(meta: dict) -> str:
    return (f"naive HF server vs pagedserve · {meta['model']} ({meta['weights']}, {meta['dtype']}) · {meta['device']} · "
            f"{meta['input_len']} in / {meta['output_len']} out · {meta['date']}")


def replot(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    print(data["table_markdown"])
    plot(data["results"], path.removesuffix(".json") + ".png", plot_title(data["meta"]))
    print(f"wrote {path.removesuffix('.json')}.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--dummy-config", default=None, help="HF config JSON: random weights (benchmarks/configs/*.json)")
    ap.add_argument("--dtype", default="auto", help="both servers (auto: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.0)
    ap.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    ap.add_argument("--tokenizer", default=None, help="bench prompt tokenizer (default: random words)")
    ap.add_argument("--server-tokenizer", default=None,
                    help="tokenizer (GGUF or HF dir) both servers use with --dummy-config (default: embedded SmolLM2)")
    ap.add_argument("--prompts-per-level", type=int, default=1, help="requests per level = level x this (default 1)")
    ap.add_argument("--min-prompts", type=int, default=4)
    ap.add_argument("--max-prompts", type=int, default=None, help="cap per level (never below the level)")
    ap.add_argument("--num-warmups", type=int, default=2)
    ap.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="e.g. ttft:1000 tpot:100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default=",".join(ENGINES), help="which to run (default both)")
    ap.add_argument("--pagedserve-args", default="", help="extra `pagedserve serve` flags (one string)")
    ap.add_argument("--baseline-args", default="", help="extra hf_server.py flags (one string)")
    ap.add_argument("--cpu-kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--results-dir", default=RESULTS)
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="an earlier seed_demo JSON whose results are kept for the engines not run now "
                         "(run --engines hf_baseline, then --engines pagedserve --merge <its JSON>)")
    ap.add_argument("--disable-tqdm", action="store_true")
    ap.add_argument("--plot-only", default=None, metavar="JSON",
                    help="redraw the PNG and reprint the table of an earlier run's JSON (no servers)")
    args = ap.parse_args(argv)
    if args.plot_only:
        return replot(args.plot_only)

    device = args.device
    if device == "auto":
        device = "cuda" if gpu_name() else "cpu"
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"--engines: unknown engine {e!r} (choose from {', '.join(ENGINES)})")
    desc, slug = describe_device(device)
    if args.dummy_config:
        model_name = os.path.splitext(os.path.basename(args.dummy_config))[0]
        weights = "dummy (random)"
    else:
        model_name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0] if args.model \
            else "smollm2-135m-instruct-q4_1"
        weights = "real (GGUF dequantized by each server)" if not args.model or args.model.endswith(".gguf") else "real"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")

    log_dir = tempfile.mkdtemp(prefix="seed_demo_logs_")
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    merged_from = None
    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        results = {e: runs for e, runs in old["results"].items() if e not in engines}
        merged_from = {"file": os.path.basename(args.merge), "engines": sorted(results),
                       "command": old["meta"]["command"], "date": old["meta"]["date"]}
    for engine in engines:
        results[engine] = run_engine(engine, args, levels, device, log_dir)
    elapsed = time.perf_counter() - t0

    md = table(results, levels)
    print(f"\nSeed demo · {model_name} ({weights}, {dtype}) · {desc} · {args.input_len} in / {args.output_len} out\n")
    print(md)
    top = max(levels)
    hf = next((r for r in results.get("hf_baseline", []) if r["max_concurrency"] == top), None)
    ps = next((r for r in results.get("pagedserve", []) if r["max_concurrency"] == top), None)
    summary = {}
    if hf and ps and hf["output_throughput"]:
        summary = {"concurrency": top, "throughput_ratio": ps["output_throughput"] / hf["output_throughput"],
                   "ttft_p99_ratio_naive_over_pagedserve": hf["p99_ttft_ms"] / max(ps["p99_ttft_ms"], 1e-9),
                   "target_throughput_ratio": 20.0,
                   "meets_targets": ps["output_throughput"] >= 20 * hf["output_throughput"]
                   and ps["p99_ttft_ms"] < hf["p99_ttft_ms"]}
        print(f"\nat concurrency {top}: pagedserve {summary['throughput_ratio']:.1f}x the naive server's output "
              f"throughput; TTFT p99 {ps['p99_ttft_ms']:.0f} ms vs {hf['p99_ttft_ms']:.0f} ms "
              f"(target >= 20x and lower p99: {'met' if summary['meets_targets'] else 'NOT met'})")

    from importlib.metadata import version

    date = dt.date.today().isoformat()
    meta = {"date": date, "device": desc, "command": " ".join(["python", *sys.argv]) if argv is None
            else " ".join(["python", "benchmarks/seed_demo.py", *argv]),
            "model": model_name, "weights": weights, "dtype": dtype, "endpoint": args.endpoint,
            "input_len": args.input_len, "output_len": args.output_len, "range_ratio": args.range_ratio,
            "concurrency": levels, "prompts_per_level": {str(c): prompts_for(c, args) for c in levels},
            "num_warmups": args.num_warmups, "elapsed_s": elapsed, "torch": version("torch"),
            "transformers": version("transformers"), "merged_from": merged_from, "pagedserve_args": args.pagedserve_args,
            "baseline_args": args.baseline_args, "engines": {e: LABELS[e] for e in results}}
    os.makedirs(args.results_dir, exist_ok=True)
    base = os.path.join(args.results_dir, f"seed_demo_{slug}_{model_name}_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "table_markdown": md, "results": results}, f, indent=2)
    try:
        plot(results, base + ".png", plot_title(meta))
        print(f"\nwrote {base}.json and .png (server logs: {log_dir})")
    except ImportError as e:  # a GPU image without matplotlib: the JSON has everything; plot it elsewhere
        print(f"\nwrote {base}.json; no plot ({e}); server logs: {log_dir}")
    failed = sum(r["failed"] for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
