"""The whole benchmark: a run per (concurrency, rate) of the sweep, the metadata, the JSON and plots."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import sys
from typing import Any

from benchmarks.serve_bench.datasets import make_requests
from benchmarks.serve_bench.metrics import parse_goodput
from benchmarks.serve_bench.report import plot_latency, plot_sweep, print_run
from benchmarks.serve_bench.run import run_once

# --save-result writes to benchmarks/results/ in a checkout; an installed wheel has none: ./results.
CHECKOUT_RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def _parse_list(value: str | None, kind) -> list:
    if value is None:
        return [None]
    out = []
    for item in str(value).split(","):
        item = item.strip().lower()
        if item in ("", "none", "unlimited", "0") and kind is int:
            out.append(None)
        elif item == "inf" and kind is float:
            out.append(float("inf"))
        else:
            v = kind(item)
            if v <= 0:
                raise ValueError(f"expected a positive value, got {item!r}")
            out.append(v)
    return out


def server_info(base_url: str, headers: dict) -> dict:
    """The first model of GET /v1/models ({} when the server has no such route)."""
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        if r.status_code == 200 and r.json().get("data"):
            return r.json()["data"][0]
    except (httpx.HTTPError, ValueError):
        pass
    return {}


def default_result_base(model: str | None) -> str:
    name = (model or "model").replace("/", "_")
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    results = CHECKOUT_RESULTS_DIR if os.path.isdir(CHECKOUT_RESULTS_DIR) else os.path.abspath("results")
    return os.path.join(results, f"bench_serve_{name}_{stamp}")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every (concurrency, rate) combination; returns {"meta", "runs", "files"}; writes the
    JSON and plots when asked."""
    if args.endpoint not in ("/v1/completions", "/v1/chat/completions"):
        raise ValueError(f"--endpoint must be /v1/completions or /v1/chat/completions, got {args.endpoint!r}")
    chat = args.endpoint.endswith("chat/completions")
    if not isinstance(args.percentiles, list):
        args.percentiles = [float(p) for p in str(args.percentiles).split(",") if p.strip()]
    slos = parse_goodput(args.goodput)
    concurrencies = _parse_list(args.max_concurrency, int)
    rates = _parse_list(args.request_rate, float)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    base = base.removesuffix("/v1")
    info = server_info(base, headers)
    model = args.model or info.get("id")
    max_model_len = args.max_model_len or info.get("max_model_len")
    reqs = make_requests(args, chat, max_model_len)
    url = base + args.endpoint

    runs = []
    for conc in concurrencies:
        for rate in rates:
            desc = f"conc {conc or 'inf'}, rate {rate:g}" if rate != float("inf") else f"conc {conc or 'inf'}"
            m = asyncio.run(run_once(reqs, url=url, headers=headers, model=model, chat=chat, args=args,
                                     request_rate=rate, max_concurrency=conc, num_warmups=args.num_warmups,
                                     slos=slos, desc=desc))
            print_run(m, args.percentiles)
            runs.append(m)

    date = dt.date.today().isoformat()
    meta = {
        "date": date, "time": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]) or "pagedserve", *sys.argv[1:]]),
        "base_url": base, "endpoint": args.endpoint, "model": model, "server_max_model_len": max_model_len,
        "device": args.device_label or "unknown (remote endpoint; pass --device-label)",
        "client_host": f"{socket.gethostname()} ({platform.machine()}, {os.cpu_count()} cpus)",
        "dataset": args.dataset_name, "num_prompts": args.num_prompts, "seed": args.seed,
        "input_len": args.input_len if args.dataset_name == "random" else None,
        "output_len": args.output_len if args.dataset_name == "random" else None,
        "range_ratio": args.range_ratio if args.dataset_name == "random" else None,
        "shared_prefixes": args.conversation_shared_prefixes if args.dataset_name == "conversation" else None,
        "prefix_len": args.conversation_prefix_len if args.dataset_name == "conversation" else None,
        "tokenizer": args.tokenizer, "num_warmups": args.num_warmups, "ignore_eos": args.ignore_eos,
        "temperature": args.temperature, "percentiles": args.percentiles, "goodput_slos_ms": slos,
        "max_concurrency": concurrencies, "request_rate": ["inf" if r == float("inf") else r for r in rates],
    }
    for item in args.metadata or ():
        k, _, v = item.partition("=")
        meta[k] = v
    out = {"meta": meta, "runs": runs, "files": []}

    path = args.result_file
    if path is None and args.save_result:
        path = default_result_base(model) + ".json"
    if path:
        stem = path.removesuffix(".json")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        out["files"].append(path)
        if not args.no_plot:
            title = (f"{model} · {args.endpoint} · {args.dataset_name} dataset, {args.num_prompts} prompts · "
                     f"{meta['device']} · {date}")
            try:
                plot_latency(runs, stem + "_latency.png", title, args.percentiles)
                out["files"].append(stem + "_latency.png")
                if len(runs) > 1:
                    plot_sweep(runs, stem + "_throughput.png", title)
                    out["files"].append(stem + "_throughput.png")
            except ImportError as e:  # e.g. a GPU image without matplotlib: keep the numbers
                print(f"warning: no plots ({e})", file=sys.stderr)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {', '.join(out['files'])}", flush=True)
    return out
