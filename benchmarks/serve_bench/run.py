"""One benchmark run: requests sent at the given arrival rate and concurrency, then measured."""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

from benchmarks.serve_bench.datasets import BenchRequest
from benchmarks.serve_bench.metrics import calculate_metrics
from benchmarks.serve_bench.stream import RequestResult, build_body, send_request


async def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yields request indices at Poisson (gamma, for burstiness != 1) arrival times."""
    t0 = time.perf_counter()
    target = 0.0
    for i in range(n):
        if i > 0 and rate != float("inf"):
            target += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
            delay = t0 + target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield i


async def run_once(reqs: list[BenchRequest], *, url: str, headers: dict, model: str | None, chat: bool,
                   args: argparse.Namespace, request_rate: float, max_concurrency: int | None,
                   num_warmups: int = 0, slos: dict[str, float] | None = None, desc: str = "") -> dict[str, Any]:
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, http2=False) as client:
        if num_warmups > 0:
            warm = reqs[:num_warmups]
            outs = await asyncio.gather(*(send_request(client, url, headers, build_body(r, model, chat, args), r,
                                                       chat, time.perf_counter()) for r in warm))
            bad = [o.error for o in outs if not o.success]
            if bad:
                raise RuntimeError(f"warm-up request failed: {bad[0]}")

        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(reqs), desc=desc or "requests", disable=args.disable_tqdm, dynamic_ncols=True,
                   file=sys.stderr)
        results: list[RequestResult | None] = [None] * len(reqs)
        t_origin = time.perf_counter()

        async def one(i: int) -> None:
            body = build_body(reqs[i], model, chat, args)
            if sem is None:
                results[i] = await send_request(client, url, headers, body, reqs[i], chat, t_origin)
            else:
                async with sem:
                    results[i] = await send_request(client, url, headers, body, reqs[i], chat, t_origin)
            bar.update(1)

        tasks = []
        rng = random.Random(args.seed + 7)
        async for i in _arrivals(len(reqs), request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_origin
        bar.close()
    m = calculate_metrics([r for r in results if r is not None], duration, slos, args.percentiles)
    m.update({"request_rate": "inf" if request_rate == float("inf") else request_rate,
              "burstiness": args.burstiness, "max_concurrency": max_concurrency, "num_prompts": len(reqs)})
    if args.save_detailed:
        m["itls_s"] = [r.itl for r in results if r is not None and r.success]
        m["generated_texts"] = [r.generated_text for r in results if r is not None and r.success]
    return m
