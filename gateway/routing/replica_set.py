"""The scheduler replicas a gateway routes over, and the choice of one per generation.

Candidates are the healthy replicas not yet tried for the request; when none is healthy, every
replica not yet tried (its scheduler queues the request while its executor comes back, or the call
fails with 503 as with a single scheduler). Replicas that discovery no longer lists are retired: no
new requests, closed once their in-flight generations end.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence

from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.routing.discovery import DnsDiscovery, parse_addresses
from gateway.routing.policies import make_policy, prompt_block_hashes
from gateway.routing.replica import Replica
from services.gen.pagedserve.v1 import tokenizer_pb2_grpc

logger = logging.getLogger(__name__)


class ReplicaSet:
    def __init__(self, config: GatewayConfig, tokenizer: tokenizer_pb2_grpc.TokenizerStub,
                 channel=None) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self._channel = channel  # (target, options) -> grpc.aio.Channel, with the internal security
        self.policy = make_policy(config.routing, config.routing_load_factor, config.routing_cache_threshold)
        self.replicas: dict[str, Replica] = {}  # in the rotation or waiting to (discovery's current set)
        self._retired: set[Replica] = set()
        self._discovery: DnsDiscovery | None = None
        self.block_size = 0  # KV block size (from the model facts), for the prefix policy's hashes
        self._m_requests = GatewayMetrics.get().replica_requests
        self._m_retries = GatewayMetrics.get().replica_retries

    def fail_all(self, error) -> int:
        """End every generation in flight on any replica with `error` (the drain's grace is over)."""
        return sum(r.step_stream.fail_all(error) for r in [*self.replicas.values(), *self._retired])

    # ------------------------------------------------------------------ membership
    async def start(self) -> None:
        if self.config.scheduler_dns:
            self._discovery = DnsDiscovery(self.config.scheduler_dns, self.config.scheduler_dns_interval_s,
                                           self.set_addresses)
            await self._discovery.start()
        else:
            self.set_addresses(parse_addresses(self.config.scheduler_address))

    def set_addresses(self, addresses: Sequence[str]) -> None:
        for a in addresses:
            if a not in self.replicas:
                r = Replica(a, self._tokenizer, retry_after_s=self.config.retry_after_s,
                            stats_interval_s=self.config.replica_stats_interval_s, on_change=self._changed,
                            channel=self._channel)
                self.replicas[a] = r
                r.start()
                logger.info("scheduler replica %s added (%d in all)", a, len(self.replicas))
        for a in [a for a in self.replicas if a not in addresses]:
            r = self.replicas.pop(a)
            r.retired = True
            self.policy.forget(a)
            self._retired.add(r)
            logger.info("scheduler replica %s removed (%d in flight on it)", a, r.in_flight)
            self._close_if_idle(r)

    def _changed(self, replica: Replica) -> None:
        if not replica.healthy:
            self.policy.forget(replica.address)  # a scheduler that died comes back with an empty cache

    def _close_if_idle(self, r: Replica) -> None:
        if r.retired and r.in_flight == 0 and r in self._retired:
            self._retired.discard(r)
            asyncio.ensure_future(r.close())

    async def close(self) -> None:
        if self._discovery is not None:
            await self._discovery.close()
        for r in [*self.replicas.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await r.close()
        self.replicas.clear()
        self._retired.clear()

    # ------------------------------------------------------------------ choice
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    def any(self) -> Replica:
        """A replica for model facts and stats: a healthy one if there is one."""
        if not self.replicas:
            raise APIError(503, "No scheduler replica is known (discovery found none).", code="service_unavailable")
        return (self.healthy() or list(self.replicas.values()))[0]

    def candidates(self, exclude: Collection[Replica] = ()) -> list[Replica]:
        rest = [r for r in self.replicas.values() if r not in exclude]
        return [r for r in rest if r.healthy] or rest

    def has_alternative(self, exclude: Collection[Replica]) -> bool:
        return any(r.healthy and r not in exclude for r in self.replicas.values())

    def acquire(self, prompt_token_ids: Sequence[int], exclude: Collection[Replica] = ()) -> Replica:
        """The replica for this prompt (its in-flight count taken); 503 when there is none."""
        cands = self.candidates(exclude)
        if not cands:
            raise APIError(503, "No scheduler replica is available.", code="service_unavailable")
        if len(cands) == 1:
            r = cands[0]
        else:
            hashes = (prompt_block_hashes(prompt_token_ids, self.block_size, self.config.routing_prefix_blocks)
                      if self.policy.needs_hashes else [])
            r = self.policy.pick(cands, hashes)  # type: ignore[assignment]
        r.in_flight += 1
        self._m_requests.labels(r.address, self.policy.name).inc()
        return r

    def release(self, r: Replica, moved: bool = False) -> None:
        """The generation left `r` (finished, or `moved` elsewhere before its first token)."""
        r.in_flight -= 1
        if moved:
            self._m_retries.labels(r.address).inc()
        self._close_if_idle(r)
