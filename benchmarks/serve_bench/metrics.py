"""The metrics of one run from its per-request results: percentiles, TPOT, throughput, goodput
(vLLM's flat result shape)."""
from __future__ import annotations

import math
from typing import Any

from benchmarks.serve_bench.stream import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
SLO_ALIASES = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "e2e": "e2el", "itl": "itl"}


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for spec in specs or ():
        for item in spec.replace(",", " ").split():
            name, _, value = item.partition(":")
            key = SLO_ALIASES.get(name.strip().lower())
            if key is None or not value:
                raise ValueError(f"bad --goodput item {item!r}: expected ttft:MS, tpot:MS, itl:MS or e2el:MS")
            slos[key] = float(value)
            if slos[key] <= 0:
                raise ValueError(f"--goodput {name} must be > 0 ms")
    return slos


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / n) if n else 0.0
    out = {"mean": mean, "median": _percentile(ms, 50), "std": std}
    for p in percentiles:
        out[f"p{p:g}"] = _percentile(ms, p)
    return out


def tpot_of(r: RequestResult) -> float | None:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def calculate_metrics(results: list[RequestResult], duration: float, slos: dict[str, float] | None = None,
                      percentiles: list[float] = (50, 90, 99)) -> dict[str, Any]:
    """vLLM's flat result shape: completed, failed, total_*_tokens, *_throughput, request_goodput,
    {mean,median,std,pNN}_{ttft,tpot,itl,e2el}_ms, plus per-request lists."""
    ok = [r for r in results if r.success]
    tpots = [t for t in (tpot_of(r) for r in ok) if t is not None]
    per_metric = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
                  "e2el": [r.latency for r in ok]}
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "request_goodput": None,
        "goodput_slos_ms": dict(slos or {}),
        "good_requests": None,
    }
    if slos:
        def good(r: RequestResult) -> bool:
            vals = {"ttft": r.ttft, "tpot": tpot_of(r) or 0.0, "e2el": r.latency, "itl": max(r.itl, default=0.0)}
            return all(vals[k] * 1000.0 <= v for k, v in slos.items())

        n_good = sum(1 for r in ok if good(r))
        m["good_requests"] = n_good
        m["request_goodput"] = n_good / duration if duration > 0 else 0.0
    for name, values in per_metric.items():
        for stat, v in _stats(values, list(percentiles)).items():
            m[f"{stat}_{name}_ms"] = v
    m["max_output_tokens_per_s"] = _peak_output_rate(ok)
    m["usage_reported"] = sum(1 for r in ok if r.usage_reported)
    m["input_lens"] = [r.prompt_len for r in ok]
    m["output_lens"] = [r.output_tokens for r in ok]
    m["ttfts_s"] = [r.ttft for r in ok]
    m["tpots_s"] = [tpot_of(r) for r in ok]
    m["e2els_s"] = [r.latency for r in ok]
    m["errors"] = [r.error for r in results if not r.success][:20]
    return m


def _peak_output_rate(ok: list[RequestResult]) -> float:
    """Highest output tokens/s over any 1 s window (token times reconstructed from the chunks)."""
    times = []
    for r in ok:
        t = r.start_time + r.ttft
        times.append(t)
        for gap in r.itl:
            t += gap
            times.append(t)
    if not times:
        return 0.0
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int(t)] = buckets.get(int(t), 0) + 1
    # chunks, not tokens: scale by tokens per chunk over the whole run
    scale = sum(r.output_tokens for r in ok) / max(1, len(times))
    return max(buckets.values()) * scale
