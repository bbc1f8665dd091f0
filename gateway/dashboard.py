"""The live dashboard: `GET /dashboard` (a static page, gateway/static/) fed by
`GET /dashboard/stream`, server-sent events of one JSON snapshot every `dashboard_interval_s`.

One `Scheduler.WatchStats(include_requests=True)` stream per gateway process, opened while at
least one browser watches and shared by all of them (`DashboardHub`); each snapshot is reduced to
what the page draws (`snapshot_payload`): queue and KV numbers, throughputs, the request and block
lists of the KV block map with the internal waste computed here, and this process's TTFT /
inter-token latency percentiles over a sliding window (gateway/metrics.py: WINDOW).

With several scheduler replicas (gateway/routing/) the stream follows one healthy replica (the
page's main numbers and block map, `replica` names it) and adds `replicas`: every replica's own
snapshot (GetStats with the block map, each snapshot) plus its health and this gateway's in-flight
count, which the page draws as one KV block map per replica.

The page and its stream are not behind `--api-key` (like /metrics): they show request ids and
token counts, never prompt or output text.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from pathlib import Path

import grpc
from fastapi import Request

from gateway.errors import APIError
from gateway.metrics import WINDOW
from services.gen.pagedserve.v1 import scheduler_pb2

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
RATE_WINDOW_S = 10.0
RETRY_S = 1.0


def _fmt(v: float | None, digits: int = 6) -> float | None:
    return None if v is None else round(float(v), digits)


class _Rates:
    """Requests finished per second and the prefix-cache hit rate over the last RATE_WINDOW_S."""

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int, int, int]] = collections.deque()

    def update(self, now: float, finished: int, queries: int, hits: int) -> tuple[float, float | None]:
        s = self._samples
        if s and (finished < s[-1][1] or queries < s[-1][2]):  # the scheduler restarted: counters reset
            s.clear()
        s.append((now, finished, queries, hits))
        while len(s) > 2 and s[1][0] <= now - RATE_WINDOW_S:
            s.popleft()
        t0, f0, q0, h0 = s[0]
        dt = now - t0
        req_rate = (finished - f0) / dt if dt > 0 else 0.0
        dq = queries - q0
        return req_rate, ((hits - h0) / dq if dq > 0 else None)


def snapshot_payload(st: scheduler_pb2.SchedulerStats, block_size: int, model: str, rates: _Rates) -> dict:
    finished = sum(st.finished_by_reason.values())
    req_rate, recent_hit_rate = rates.update(time.monotonic(), finished, st.prefix_cache_queries,
                                             st.prefix_cache_hits)
    requests = []
    filled_by_block: dict[int, int] = {}
    preempted = 0
    for r in st.requests:
        if r.status == "preempted":
            preempted += 1
        blocks = list(r.block_ids)
        requests.append({"id": r.request_id, "status": r.status, "prompt": r.num_prompt_tokens,
                         "output": r.num_output_tokens, "computed": r.num_computed_tokens, "blocks": blocks})
        if block_size:
            live = min(r.num_computed_tokens, r.num_prompt_tokens + r.num_output_tokens)
            for j, b in enumerate(blocks):
                n = min(block_size, max(0, live - j * block_size))
                if n > filled_by_block.get(b, 0):
                    filled_by_block[b] = n
    index = {r["id"]: i for i, r in enumerate(requests)}
    blocks = []
    used = shared = cached_only = filled = 0
    for b in st.blocks:
        holders = [index[h] for h in b.request_ids if h in index]
        blocks.append([b.block_id, b.ref_count, 1 if b.cached else 0, holders])
        if b.ref_count > 0:
            used += 1
            filled += filled_by_block.get(b.block_id, 0)
            if b.ref_count > 1:
                shared += 1
        elif b.cached:
            cached_only += 1
    slots = used * block_size
    return {
        "t": _fmt(st.timestamp, 3),
        "model": model,
        "block_size": block_size,
        "num_kv_blocks": st.num_kv_blocks,
        "running": st.num_running,
        "waiting": st.num_waiting,
        "preempted": preempted,
        "num_preemptions_total": st.num_preemptions,
        "kv_usage": _fmt(st.kv_cache_usage),
        "prefix_hit_rate": _fmt(st.prefix_cache_hit_rate),
        "prefix_hit_rate_recent": _fmt(recent_hit_rate),
        "prefix_cache_queries": st.prefix_cache_queries,
        "prefix_cache_hits": st.prefix_cache_hits,
        "prompt_tps": _fmt(st.prompt_throughput_tps, 2),
        "gen_tps": _fmt(st.generation_throughput_tps, 2),
        "req_per_s": _fmt(req_rate, 3),
        "finished_total": finished,
        "finished_by_reason": dict(st.finished_by_reason),
        "prompt_tokens_total": st.prompt_tokens_total,
        "generation_tokens_total": st.generation_tokens_total,
        "step_tokens": st.step_num_batched_tokens,
        "step_seqs": st.step_num_seqs,
        "executor_healthy": st.executor_healthy,
        "latency": WINDOW.summary(),
        "requests": requests,
        "blocks": blocks,
        "kv": {"used_blocks": used, "shared_blocks": shared, "cached_free_blocks": cached_only,
               "slots": slots, "filled_slots": filled,
               "waste_pct": _fmt(100.0 * (1 - filled / slots), 3) if slots else 0.0},
    }


class DashboardHub:
    """Fans one WatchStats stream out to every open /dashboard/stream (latest snapshot wins: a
    slow browser skips snapshots instead of queueing them)."""

    def __init__(self, backend, interval_s: float = 0.5) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self._subscribers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None
        self.last: bytes | None = None

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._subscribers.add(q)
        if self.last is not None:
            q.put_nowait(self.last)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)
        if not self._subscribers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):  # cancelled, or a failure already logged
                await self._task
            self._task = None

    def _publish(self, data: bytes) -> None:
        self.last = data
        for q in self._subscribers:
            if q.full():
                try:
                    q.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            q.put_nowait(data)

    async def _replicas(self, primary, st: scheduler_pb2.SchedulerStats, block_size: int, model: str,
                        rates: dict[str, _Rates]) -> list[dict]:
        """Every replica's snapshot (the primary's is `st`); a replica that does not answer in time
        is listed with why."""
        async def one(r) -> dict:
            head = {"address": r.address, "healthy": r.healthy, "reason": r.reason, "in_flight": r.in_flight}
            try:
                rs = st if r is primary else await r.scheduler.GetStats(
                    scheduler_pb2.GetStatsRequest(include_requests=True), timeout=max(1.0, self.interval_s))
            except grpc.RpcError as e:
                return {**head, "error": f"unavailable: {e.code().name}"}
            snap = snapshot_payload(rs, block_size, model, rates.setdefault(r.address, _Rates()))
            snap.pop("latency")
            return {**head, **snap}

        return list(await asyncio.gather(*(one(r) for r in self.backend.replicas.replicas.values())))

    async def _run(self) -> None:
        rates = _Rates()
        replica_rates: dict[str, _Rates] = {}
        while self._subscribers:
            try:
                primary = self.backend.replicas.any()
                info = await primary.scheduler.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=5)
                block_size = info.executor.block_size
                model = self.backend.model_label or info.executor.model_name
                call = primary.scheduler.WatchStats(
                    scheduler_pb2.WatchStatsRequest(interval_s=self.interval_s, include_requests=True))
                try:
                    async for st in call:
                        payload = snapshot_payload(st, block_size, model, rates)
                        if len(self.backend.replicas.replicas) > 1:
                            payload["replica"] = primary.address
                            payload["replicas"] = await self._replicas(primary, st, block_size, model,
                                                                       replica_rates)
                        self._publish(json.dumps(payload, separators=(",", ":")).encode())
                finally:
                    call.cancel()
                error = "the scheduler ended the stats stream"
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as e:
                error = f"scheduler unavailable: {e.code().name}"
            except APIError as e:  # no replica known (DNS discovery found none)
                error = e.message
            except Exception as e:
                logger.exception("dashboard stream failed")
                error = f"{type(e).__name__}: {e}"
            self._publish(json.dumps({"error": error, "t": time.time()}).encode())
            await asyncio.sleep(RETRY_S)


def install(app, backend, interval_s: float) -> DashboardHub:
    """Routes: GET /dashboard (the page), /dashboard/static/* (its JS/CSS), /dashboard/stream (SSE)."""
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    from gateway.streaming import event_stream

    hub = DashboardHub(backend, interval_s)
    page = (STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/stream", include_in_schema=False)
    async def dashboard_stream(request: Request):
        q = hub.subscribe()

        async def events():
            try:
                yield b"retry: 2000\n\n"
                while True:
                    try:
                        data = await asyncio.wait_for(q.get(), 15.0)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield b"data: " + data + b"\n\n"
            finally:
                hub.unsubscribe(q)

        # on_close also runs when the response is cancelled before the generator started
        return event_stream(events(), lambda: hub.unsubscribe(q))

    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    return hub
