"""One scheduler replica as the gateway sees it: its channel, its multiplexed GenerateStream
(gateway/step_stream.py), its load, and whether it is in the rotation.

Health and load come from the replica's `Scheduler.WatchStats` stream (one snapshot every
`replica_stats_interval_s`): the replica is healthy while that stream delivers and its executor
answers. A stream that breaks (the scheduler died) takes it out of the rotation at once; the watcher
reconnects every RETRY_S and puts it back with the first good snapshot. Until the first snapshot a
replica is assumed healthy, so requests flow while the watcher connects.

Load = max(generations this gateway has in flight on it, running + waiting in its last snapshot):
the local count reacts at once to a burst, the scheduler's count sees other gateways' requests.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2_grpc

from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.step_stream import StepStream
from services.gen.pagedserve.v1 import (
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2_grpc,
)
from services.grpc_server import channel_options

logger = logging.getLogger(__name__)

RETRY_S = 1.0


class Replica:
    def __init__(self, address: str, tokenizer: tokenizer_pb2_grpc.TokenizerStub, *, retry_after_s: int,
                 stats_interval_s: float, on_change: Callable[[Replica], None] | None = None,
                 channel: Callable[[str, list], grpc.aio.Channel] | None = None) -> None:
        self.address = address
        # `channel`: the internal security's channel factory (service token / mTLS); plain otherwise.
        make = channel or (lambda target, options: grpc.aio.insecure_channel(target, options=options))
        self._channel = make(address, channel_options())
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self.health = health_pb2_grpc.HealthStub(self._channel)
        self.step_stream = StepStream(self.scheduler, tokenizer, retry_after_s, on_broken=self._stream_broken)
        self.stats_interval_s = stats_interval_s
        self._on_change = on_change
        self.healthy = True  # assumed until the first snapshot (or failure) says otherwise
        self.reason = "not checked yet"
        self.stats: scheduler_pb2.SchedulerStats | None = None
        self.in_flight = 0  # this gateway's generations on it (started, not closed)
        self.retired = False  # gone from discovery: no new requests, closed once idle
        self._task: asyncio.Task | None = None
        m = GatewayMetrics.get()
        self._m_healthy = m.replica_healthy.labels(address)
        self._m_running = m.replica_running.labels(address)
        self._m_waiting = m.replica_waiting.labels(address)
        self._m_kv = m.replica_kv_usage.labels(address)
        self._m_hits = m.replica_prefix_hits.labels(address)
        self._m_queries = m.replica_prefix_queries.labels(address)
        self._m_healthy.set(1)

    def __repr__(self) -> str:
        return f"Replica({self.address}, {'healthy' if self.healthy else 'down: ' + self.reason}, load {self.load})"

    # ------------------------------------------------------------------ load
    @property
    def load(self) -> int:
        st = self.stats
        reported = st.num_running + st.num_waiting if st is not None else 0
        return max(self.in_flight, reported)

    @property
    def kv_usage(self) -> float:
        return self.stats.kv_cache_usage if self.stats is not None else 0.0

    # ------------------------------------------------------------------ health
    def _set_healthy(self, healthy: bool, reason: str) -> None:
        changed = healthy != self.healthy
        self.healthy, self.reason = healthy, reason
        self._m_healthy.set(1 if healthy else 0)
        if changed:
            if healthy:
                logger.info("replica %s is back in the rotation", self.address)
            else:
                logger.warning("replica %s leaves the rotation: %s", self.address, reason)
            if self._on_change is not None:
                self._on_change(self)

    def _stream_broken(self, error: APIError) -> None:
        self._set_healthy(False, f"generate stream failed: {error.message}")

    def _observe(self, st: scheduler_pb2.SchedulerStats) -> None:
        self.stats = st
        self._m_running.set(st.num_running)
        self._m_waiting.set(st.num_waiting)
        self._m_kv.set(st.kv_cache_usage)
        self._m_hits.set(st.prefix_cache_hits)
        self._m_queries.set(st.prefix_cache_queries)
        self._set_healthy(st.executor_healthy, "ok" if st.executor_healthy else "its executor is not answering")

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        request = scheduler_pb2.WatchStatsRequest(interval_s=self.stats_interval_s)
        while True:
            call = self.scheduler.WatchStats(request)
            try:
                async for st in call:
                    self._observe(st)
                reason = "the scheduler ended its stats stream"
            except grpc.RpcError as e:
                reason = f"unreachable ({e.code().name})"
            finally:
                call.cancel()
            self.stats = None
            self._set_healthy(False, reason)
            await asyncio.sleep(RETRY_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.step_stream.close()
        await self._channel.close(grace=None)
