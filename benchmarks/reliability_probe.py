"""Hostile-user probe of a running stack (issue 16): the figures in docs/RELIABILITY.md.

    PAGEDSERVE_SERVICE_TOKEN_FILE=... python benchmarks/reliability_probe.py --url http://127.0.0.1:8000 \
        --scheduler-address 127.0.0.1:50051 [--out benchmarks/results/reliability_cpu_<date>.json]

Runs, in order, against the gateway (and the scheduler's GetStats for KV leaks):
  flood      2 requests with --flood-prompts prompts each + 20 ordinary ones at once: how many
             ordinary ones fail (issue: 13 of 20 with 5,000-prompt floods);
  too_many   one request with 5,000 prompts: status and time to answer;
  huge       one 10 MB prompt: status and time to answer (issue: ~20 s of tokenizer CPU);
  drops      100 streams, 70 closed after their first chunk: KV blocks held once all are done;
  junk       2,000 requests with WebDAV methods: growth of /metrics series;
  nan        temperature NaN / Infinity / 1e308: statuses;
  internal   GetStats without the service token: the gRPC status.
No peer: these are correctness figures (failures, leaks, statuses), with wall times for context.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import socket
import sys
import time

import grpc
import httpx

from services.gen.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.internal_auth import InternalSecurity

JUNK = ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PURGE", "SEARCH", "REPORT", "MERGE")


async def flood(url: str, prompts: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        big = [c.post("/v1/completions", json={"prompt": [f"{k} {i} hello" for i in range(prompts)],
                                                "max_tokens": 1}) for k in range(2)]
        small = [c.post("/v1/completions", json={"prompt": f"Hello {i}", "max_tokens": 4}) for i in range(20)]
        t0 = time.perf_counter()
        rs = await asyncio.gather(*big, *small, return_exceptions=True)
        wall = time.perf_counter() - t0
    codes = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in rs]
    return {"flood_statuses": codes[:2], "ordinary_failed": sum(1 for x in codes[2:] if x != 200),
            "ordinary": 20, "wall_s": round(wall, 2)}


def timed_post(url: str, body: dict | bytes) -> dict:
    t0 = time.perf_counter()
    if isinstance(body, bytes):
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=300)
    else:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    return {"status": r.status_code, "code": (r.json().get("error") or {}).get("code") if r.status_code != 200
            else None, "seconds": round(time.perf_counter() - t0, 3)}


def kv_in_use(scheduler: str, security: InternalSecurity) -> int:
    with security.channel(scheduler) as ch:
        st = scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
    return st.num_kv_blocks - st.num_free_blocks


async def drops(url: str) -> dict:
    async def one(c: httpx.AsyncClient, i: int, drop: bool) -> str:
        async with c.stream("POST", "/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": 24,
                                                              "stream": True}) as r:
            async for line in r.aiter_lines():
                if drop and line.startswith("data: "):
                    return "dropped"
                if line == "data: [DONE]":
                    return "done"
        return "eof"

    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=200)) as c:
        res = await asyncio.gather(*(one(c, i, i % 10 < 7) for i in range(100)), return_exceptions=True)
    return {"dropped": sum(1 for r in res if r == "dropped"), "completed": sum(1 for r in res if r == "done"),
            "errors": sum(1 for r in res if isinstance(r, BaseException))}


def metrics_series(url: str) -> tuple[int, int]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    return len(lines), len(text)


def junk(url: str, n: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    before = metrics_series(url)
    for i in range(n):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"{JUNK[i % len(JUNK)]} /x{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            while s.recv(65536):
                pass
    after = metrics_series(url)
    return {"requests": n, "series_added": after[0] - before[0], "bytes_added": after[1] - before[1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--scheduler-address", default="127.0.0.1:50051")
    p.add_argument("--flood-prompts", type=int, default=256, help="prompts per flood request (the gateway's cap)")
    p.add_argument("--junk", type=int, default=2000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    security = InternalSecurity.from_env()
    out: dict = {"date": datetime.date.today().isoformat(), "device": f"CPU ({platform.processor() or 'x86_64'})",
                 "command": " ".join(sys.argv)}
    out["flood"] = asyncio.run(flood(args.url, args.flood_prompts))
    out["too_many_prompts"] = timed_post(args.url, {"prompt": ["hi"] * 5000, "max_tokens": 1})
    out["huge_prompt_10mb"] = timed_post(args.url, {"prompt": "a" * 10_000_000, "max_tokens": 1})
    out["drops"] = asyncio.run(drops(args.url))
    time.sleep(1.0)
    out["drops"]["kv_blocks_in_use_after"] = kv_in_use(args.scheduler_address, security)
    out["junk_methods"] = junk(args.url, args.junk)
    out["non_finite"] = {raw: timed_post(args.url, f'{{"prompt": "x", "temperature": {raw}}}'.encode())["status"]
                         for raw in ("NaN", "Infinity", "1e308")}
    try:
        with grpc.insecure_channel(args.scheduler_address) as ch:
            scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
        out["internal_without_token"] = "OK"
    except grpc.RpcError as e:
        out["internal_without_token"] = e.code().name
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
