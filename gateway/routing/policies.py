"""Which replica a prompt goes to (`--routing prefix|least-load|round-robin`).

prefix (default): cache-aware routing with bounded load, after SGLang's router. The key of a prompt
is the chain of its full KV blocks' hashes, computed with the engine's own chained block hash
(engine_core/block_manager.py `hash_block_tokens`), so two prompts share a key prefix exactly when
the engine's prefix cache could share their blocks. The policy remembers which replica each block
hash was sent to (an LRU table: a radix tree at block granularity) and sends a prompt to the
replica holding the longest run of its leading blocks, provided
- that run covers at least `cache_threshold` of the prompt's hashed blocks (a shared chat-template
  header alone is no reason to pile every prompt onto one replica), and
- the replica is not overloaded: load + 1 <= load_factor x the mean load (consistent hashing with
  bounded loads' capacity rule) or it is less than BALANCE_SLACK above the least loaded one.
A prompt with no such match is a new prefix: it goes to the replica with the least load, ties to the
one remembering the fewest blocks (so new prefixes spread). An overloaded match falls back to
least-load too.

least-load: the smallest load (a replica's in-flight + queued requests), ties by KV usage.
round-robin: each healthy replica in turn.
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Protocol

from engine_core.block_manager import hash_block_tokens

POLICIES = ("prefix", "least-load", "round-robin")
BALANCE_SLACK = 4  # requests: below this imbalance a matched replica keeps its prefixes


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[bytes]:
    """The engine's chained hashes of the prompt's first full blocks (at most max_blocks)."""
    n = min(len(token_ids) // block_size, max_blocks) if block_size > 0 else 0
    out: list[bytes] = []
    parent = None
    for i in range(n):
        parent = hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class ReplicaLike(Protocol):
    address: str

    @property
    def load(self) -> int: ...

    @property
    def kv_usage(self) -> float: ...


class RoutingPolicy(Protocol):
    name: str
    needs_hashes: bool

    def pick(self, replicas: Sequence[ReplicaLike], hashes: list[bytes]) -> ReplicaLike: ...

    def forget(self, address: str) -> None: ...


class RoundRobinPolicy:
    name, needs_hashes = "round-robin", False

    def __init__(self) -> None:
        self._next = itertools.count()

    def pick(self, replicas: Sequence[ReplicaLike], hashes: list[bytes]) -> ReplicaLike:
        ordered = sorted(replicas, key=lambda r: r.address)
        return ordered[next(self._next) % len(ordered)]

    def forget(self, address: str) -> None:
        pass


class LeastLoadPolicy:
    name, needs_hashes = "least-load", False

    def __init__(self) -> None:
        self._rr = RoundRobinPolicy()

    def pick(self, replicas: Sequence[ReplicaLike], hashes: list[bytes]) -> ReplicaLike:
        best = min((r.load, r.kv_usage) for r in replicas)
        tied = [r for r in replicas if (r.load, r.kv_usage) == best]
        return tied[0] if len(tied) == 1 else self._rr.pick(tied, hashes)

    def forget(self, address: str) -> None:
        pass


class PrefixPolicy:
    name, needs_hashes = "prefix", True

    def __init__(self, load_factor: float = 1.5, cache_threshold: float = 0.5, max_entries: int = 1 << 18) -> None:
        if load_factor < 1.0:
            raise ValueError(f"the routing load factor must be >= 1, got {load_factor}")
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"the routing cache threshold must be in [0, 1], got {cache_threshold}")
        self.load_factor = load_factor
        self.cache_threshold = cache_threshold
        self.max_entries = max_entries
        self._owners: collections.OrderedDict[bytes, set[str]] = collections.OrderedDict()
        self._sizes: collections.Counter[str] = collections.Counter()  # blocks remembered per replica
        self._least = LeastLoadPolicy()

    def matched_blocks(self, address: str, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            owners = self._owners.get(h)
            if owners is None or address not in owners:
                break
            n += 1
        return n

    def _overloaded(self, r: ReplicaLike, replicas: Sequence[ReplicaLike]) -> bool:
        loads = [x.load for x in replicas]
        capacity = self.load_factor * (sum(loads) + 1) / len(loads)
        return r.load + 1 > capacity and r.load - min(loads) >= BALANCE_SLACK

    def pick(self, replicas: Sequence[ReplicaLike], hashes: list[bytes]) -> ReplicaLike:
        if not hashes:
            return self._least.pick(replicas, hashes)
        best, best_len = None, 0
        for r in replicas:
            m = self.matched_blocks(r.address, hashes)
            if m > best_len or (m == best_len and m > 0 and best is not None and r.load < best.load):
                best, best_len = r, m
        if best is not None and best_len >= self.cache_threshold * len(hashes) and \
                not self._overloaded(best, replicas):
            chosen = best
        else:
            low = min(r.load for r in replicas)
            fresh = [r for r in replicas if r.load == low]
            chosen = min(fresh, key=lambda r: (self._sizes[r.address], r.kv_usage, r.address))
        self._remember(chosen.address, hashes)
        return chosen

    def _remember(self, address: str, hashes: list[bytes]) -> None:
        owners_of = self._owners
        for h in hashes:
            owners = owners_of.get(h)
            if owners is None:
                owners = owners_of[h] = set()
            else:
                owners_of.move_to_end(h)
            if address not in owners:
                owners.add(address)
                self._sizes[address] += 1
        while len(owners_of) > self.max_entries:
            _, gone = owners_of.popitem(last=False)
            for a in gone:
                self._sizes[a] -= 1

    def forget(self, address: str) -> None:
        """A replica left (or restarted empty): its cached prefixes are gone."""
        for h in [h for h, owners in self._owners.items() if address in owners]:
            owners = self._owners[h]
            owners.discard(address)
            if not owners:
                del self._owners[h]
        self._sizes.pop(address, None)


def make_policy(name: str, load_factor: float = 1.5, cache_threshold: float = 0.5) -> RoutingPolicy:
    if name == "prefix":
        return PrefixPolicy(load_factor, cache_threshold)
    if name == "least-load":
        return LeastLoadPolicy()
    if name == "round-robin":
        return RoundRobinPolicy()
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
