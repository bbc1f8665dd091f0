"""The results shown: the summary table on stdout and the latency / sweep plots (PNG)."""
from __future__ import annotations

import math
from typing import Any

from benchmarks.serve_bench.metrics import METRIC_TITLES, METRICS


def print_run(m: dict[str, Any], percentiles: list[float]) -> None:
    w = 50
    conc = m.get("max_concurrency")
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    rows = [("Request rate (req/s):", m["request_rate"]), ("Max concurrency:", conc if conc else "unlimited"),
            ("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"), ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}")]
    if m.get("request_goodput") is not None:
        rows.append((f"Request goodput (req/s) {_slo_text(m['goodput_slos_ms'])}:", f"{m['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
             ("Peak output token throughput (tok/s):", f"{m['max_output_tokens_per_s']:.2f}"),
             ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<40}{v!s:>10}")
    for name in METRICS:
        print("{s:{c}^{n}}".format(s=f" {METRIC_TITLES[name]} ", n=w, c="-"))
        print(f"{'Mean ' + name.upper() + ' (ms):':<40}{m[f'mean_{name}_ms']:>10.2f}")
        for p in percentiles:
            print(f"{f'P{p:g} ' + name.upper() + ' (ms):':<40}{m[f'p{p:g}_{name}_ms']:>10.2f}")
    if m["errors"]:
        print(f"first errors: {m['errors'][:3]}")
    print("=" * w, flush=True)


def _slo_text(slos: dict[str, float]) -> str:
    return "[" + ", ".join(f"{k}<={v:g}ms" for k, v in slos.items()) + "]"


def run_label(m: dict[str, Any]) -> str:
    conc = m.get("max_concurrency")
    rate = m.get("request_rate")
    parts = []
    if conc:
        parts.append(f"concurrency {conc}")
    if rate != "inf" or not conc:
        parts.append(f"rate {rate}/s" if rate != "inf" else "all at once")
    return ", ".join(parts)


def plot_latency(runs: list[dict[str, Any]], path: str, title: str, percentiles: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = ["mean"] + [f"p{p:g}" for p in percentiles]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    width = 0.8 / max(1, len(runs))
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes, METRICS):
        for k, m in enumerate(runs):
            xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(stats))]
            ax.bar(xs, [m[f"{s}_{name}_ms"] for s in stats], width, label=run_label(m),
                   color=cmap(k / max(1, len(runs) - 1)) if len(runs) > 1 else "#3b7dd8")
        ax.set_xticks(range(len(stats)), stats)
        ax.set_title(f"{METRIC_TITLES[name]} (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(runs: list[dict[str, Any]], path: str, title: str) -> None:
    """Throughput and latency vs concurrency (or vs request rate when the concurrency is fixed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_conc = len({m.get("max_concurrency") for m in runs}) > 1 and all(m.get("max_concurrency") for m in runs)
    keys = [m["max_concurrency"] if by_conc else (math.inf if m["request_rate"] == "inf" else m["request_rate"])
            for m in runs]
    order = sorted(range(len(runs)), key=lambda i: keys[i])
    r = [runs[i] for i in order]
    labels = [run_label(m) if not by_conc else str(m["max_concurrency"]) for m in r]
    # concurrency: a log2 axis; anything else (rates, inf, mixed): evenly spaced categories
    x = [m["max_concurrency"] for m in r] if by_conc else list(range(len(r)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.plot(x, [m["output_throughput"] for m in r], "o-", label="output tok/s")
    a1.plot(x, [m["total_token_throughput"] for m in r], "s--", label="total (in+out) tok/s", alpha=0.7)
    if any(m.get("request_goodput") is not None for m in r):
        a1b = a1.twinx()
        a1b.plot(x, [m.get("request_goodput") or 0 for m in r], "^:", color="tab:green", label="goodput req/s")
        a1b.set_ylabel("goodput (req/s)")
        a1b.legend(loc="lower right", fontsize=8)
    a1.set_ylabel("tokens / s")
    a1.legend(loc="upper left", fontsize=8)
    a1.set_title("throughput")
    for name, marker, color in (("ttft", "o", "tab:blue"), ("tpot", "s", "tab:orange"), ("e2el", "^", "tab:purple")):
        for stat, line in (("p50", "-"), ("p99", "--")):
            a2.plot(x, [m[f"{stat}_{name}_ms"] for m in r], marker + line, color=color, alpha=1.0 if stat == "p50"
                    else 0.6, label=f"{name.upper()} {stat}")
    a2.set_yscale("log")
    a2.set_ylabel("ms (log)")
    a2.set_title("latency")
    a2.legend(fontsize=7, ncol=2)
    for ax in (a1, a2):
        ax.set_xlabel("max concurrency" if by_conc else "load")
        if by_conc:
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, labels, fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
