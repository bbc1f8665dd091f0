"""Scale-out benchmark (issue 18): `pagedserve bench serve --dataset conversation` with shared
prefixes against `pagedserve serve --replicas 1` and `--replicas 2`, the two-replica stack once with
prefix routing and once with round-robin. The stacks run one after the other, never together.

    # CPU simulation of two devices: each replica's executor pinned to its own core(s)
    python benchmarks/replica_scaling.py --device cpu --cpus-per-replica 1
    # GPUs: one replica per GPU (pagedserve serve --replicas N sets CUDA_VISIBLE_DEVICES)
    python benchmarks/replica_scaling.py --device cuda --num-prompts 2000 --max-concurrency 256 ...

Workload: --num-prompts chat conversations (the serve bench's ShareGPT-like mix), each starting with
one of --shared-prefixes system prompts of --prefix-len tokens, --max-concurrency in flight. Per
configuration: output throughput, TTFT p50 / p99, the replicas' prefix-cache hit rate over the run
(from the gateway's per-replica gauges) and how many requests each replica got. Prints the two
ratios the issue sets goals for, measured in the same run: 2 replicas / 1 replica throughput (goal
>= 1.8x) and round-robin / prefix TTFT p50 (goal >= 1.3x); writes
benchmarks/results/replica_scaling_<device>_<date>.json and .png (device, date, command in the meta).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import serve_bench
from benchmarks.servers import start_pagedserve

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIGS = (("1 replica", 1, "prefix"), ("2 replicas, prefix", 2, "prefix"), ("2 replicas, round-robin", 2, "round-robin"))
KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms", "errors")


def embedded_model_name() -> str:
    from engine_core.loader.model_source import embedded_gguf_path

    return os.path.basename(embedded_gguf_path()).removesuffix(".gguf")


def replica_metrics(url: str) -> dict[str, dict[str, float]]:
    """{replica: {"hits", "queries", "requests"}} from the gateway's /metrics."""
    import httpx

    out: dict[str, dict[str, float]] = {}
    names = {"replica_prefix_cache_hits": "hits", "replica_prefix_cache_queries": "queries",
             "replica_requests_total": "requests"}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"pagedserve:(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) in names:
            rep = re.search(r'replica="([^"]+)"', m.group(2)).group(1)
            d = out.setdefault(rep, {"hits": 0.0, "queries": 0.0, "requests": 0.0})
            d[names[m.group(1)]] += float(m.group(3))
    return out


def run_config(label: str, replicas: int, routing: str, args: argparse.Namespace, log_dir: str) -> dict:
    import time

    extra = ["--replicas", str(replicas), "--routing", routing, "--max-model-len", str(args.max_model_len),
             "--max-num-seqs", str(args.max_num_seqs), "--quiet"]
    if args.device == "cpu":
        extra += ["--kv-cache-memory-gb", str(args.cpu_kv_cache_gb)]
        if args.cpus_per_replica:
            extra += ["--cpus-per-replica", str(args.cpus_per_replica)]
    extra += shlex.split(args.pagedserve_args)
    log = os.path.join(log_dir, f"pagedserve_{replicas}_{routing}.log")
    server = start_pagedserve(args.model, device=args.device, extra=extra, log_path=log)
    print(f"\n### {label}: starting ({' '.join(server.argv[1:])})", flush=True)
    try:
        url = server.wait_ready(args.startup_timeout)
        bargs = serve_bench.bench_args(
            base_url=url, endpoint="/v1/chat/completions", dataset_name="conversation",
            num_prompts=args.num_prompts, max_concurrency=str(args.max_concurrency), seed=args.seed,
            conversation_shared_prefixes=args.shared_prefixes, conversation_prefix_len=args.prefix_len,
            conversation_input_median=args.input_median, conversation_output_median=args.output_median,
            conversation_sigma=args.sigma, conversation_max_input=args.max_input,
            conversation_max_output=args.max_output, num_warmups=args.num_warmups, disable_tqdm=True,
            no_plot=True)
        time.sleep(1.0)  # a fresh stats snapshot before the counters are read
        before = replica_metrics(url)
        out = serve_bench.run_benchmark(bargs)
        time.sleep(1.0)
        after = replica_metrics(url)
    finally:
        server.stop()
    m = out["runs"][0]
    per = {rep: {k: after[rep][k] - before.get(rep, {}).get(k, 0.0) for k in after[rep]} for rep in after}
    hits, queries = sum(d["hits"] for d in per.values()), sum(d["queries"] for d in per.values())
    row = {"config": label, "replicas": replicas, "routing": routing, **{k: m.get(k) for k in KEEP},
           "prefix_cache_hit_rate": hits / queries if queries else None,
           "requests_per_replica": sorted(int(d["requests"]) for d in per.values())}
    print(f"### {label}: {row['output_throughput']:.1f} output tok/s, TTFT p50 {row['median_ttft_ms']:.0f} ms "
          f"p99 {row['p99_ttft_ms']:.0f} ms, hit rate {row['prefix_cache_hit_rate']:.3f}, "
          f"requests per replica {row['requests_per_replica']}", flush=True)
    return row


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    labels = [r["config"].replace(", ", "\n") for r in rows]
    colours = ["#7f7f7f", "#1f77b4", "#ff7f0e"][:len(rows)]
    for ax, key, name in zip(axes, ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "prefix_cache_hit_rate"),
                             ("output tok/s (higher is better)", "TTFT p50, ms", "TTFT p99, ms",
                              "prefix-cache hit rate")):
        vals = [r[key] or 0.0 for r in rows]
        ax.bar(labels, vals, color=colours)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="bottom", fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpus-per-replica", type=int, default=1, help="CPU: cores pinned to each replica (0: unpinned)")
    p.add_argument("--cpu-kv-cache-gb", type=float, default=0.25)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--shared-prefixes", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--input-median", type=float, default=32)
    p.add_argument("--output-median", type=float, default=24)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--max-input", type=int, default=128)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pagedserve-args", default="", help="more `pagedserve serve` flags")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/replica_scaling_<device>_<date>.json)")
    args = p.parse_args(argv)

    date = dt.date.today().isoformat()
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # a shared machine: how busy it was
    device = "cpu" if args.device == "cpu" else args.device
    if args.device == "cpu":
        where = (f"cpu ({platform.machine()}, {os.cpu_count()} cores; each replica's executor pinned to "
                 f"{args.cpus_per_replica or 'all'} core(s); gateway, tokenizer and client unpinned)")
    else:
        where = args.device
    rows = []
    with tempfile.TemporaryDirectory(prefix="replica-scaling-") as log_dir:
        for label, n, routing in CONFIGS:
            rows.append(run_config(label, n, routing, args, log_dir))
    one, pre, rr = rows
    scaling = pre["output_throughput"] / one["output_throughput"]
    ttft_ratio = rr["median_ttft_ms"] / pre["median_ttft_ms"]
    print("\n| configuration | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | hit rate | requests per replica |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | "
              f"{r['prefix_cache_hit_rate']:.3f} | {r['requests_per_replica']} |")
    print(f"\n2 replicas (prefix) / 1 replica output throughput: {scaling:.2f}x (goal >= 1.8x)")
    print(f"round-robin / prefix TTFT p50: {ttft_ratio:.2f}x (goal >= 1.3x)")
    meta = {"date": date, "time": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/replica_scaling.py", *(argv if argv is not None else sys.argv[1:])]),
            "device": where, "model": args.model or f"embedded {embedded_model_name()} (fp32 compute)",
            "loadavg_at_start": load_at_start,
            "workload": {k: getattr(args, k) for k in ("num_prompts", "max_concurrency", "shared_prefixes", "prefix_len",
                                                       "input_median", "output_median", "sigma", "max_input",
                                                       "max_output", "seed")},
            "bench": "pagedserve bench serve --endpoint /v1/chat/completions --dataset conversation "
                     "--conversation-shared-prefixes K --conversation-prefix-len L (via run_benchmark)"}
    out = {"meta": meta, "runs": rows,
           "ratios": {"throughput_2_replicas_over_1": scaling, "goal_throughput": 1.8,
                      "ttft_p50_round_robin_over_prefix": ttft_ratio, "goal_ttft": 1.3}}
    path = args.out or os.path.join(RESULTS, f"replica_scaling_{device}_{date}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    png = path.removesuffix(".json") + ".png"
    plot(rows, png, f"replica scaling · {meta['model']} · {where} · {date}\n"
                    f"2 replicas / 1: {scaling:.2f}x throughput; round-robin / prefix TTFT p50: {ttft_ratio:.2f}x")
    print(f"wrote {path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
