"""gateway/routing without servers: the prefix key is the engine's chained block hash, the three
policies' choices (affinity, spreading new prefixes, bounded load, forgetting a replica), address
parsing and DNS discovery."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from engine_core.block_manager import BlockManager
from engine_core.request import Request
from engine_core.sampling_params import SamplingParams
from gateway.routing.discovery import DnsDiscovery, parse_addresses, split_dns_target
from gateway.routing.policies import (
    LeastLoadPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
    make_policy,
    prompt_block_hashes,
)


@dataclass(eq=False)
class FakeReplica:
    address: str
    load: int = 0
    kv_usage: float = 0.0


def test_prefix_key_is_the_engines_block_hash():
    prompt = list(range(100, 171))  # 71 tokens: 4 full blocks of 16, the engine hashes at most (71-1)//16
    bm = BlockManager(num_blocks=16, block_size=16)
    req = Request("r", prompt, SamplingParams())
    bm.get_computed_blocks(req)
    assert len(req.block_hashes) == 4
    assert prompt_block_hashes(prompt, 16, 32) == req.block_hashes
    assert prompt_block_hashes(prompt, 16, 2) == req.block_hashes[:2]
    assert prompt_block_hashes(prompt[:15], 16, 32) == []  # no full block: no key


def _prompt(system: int, user: int, n_system_blocks: int = 6) -> list[int]:
    return [1000 + system] * (16 * n_system_blocks) + [5000 + user] * 20


def test_prefix_policy_keeps_each_prefix_on_one_replica_and_spreads_new_ones():
    a, b = FakeReplica("a:1"), FakeReplica("b:1")
    pol = PrefixPolicy()
    where: dict[int, set[str]] = {}
    for i in range(40):
        system = i % 4
        r = pol.pick([a, b], prompt_block_hashes(_prompt(system, i), 16, 32))
        r.load += 1  # in flight
        where.setdefault(system, set()).add(r.address)
    assert all(len(v) == 1 for v in where.values()), where
    assert {next(iter(v)) for v in where.values()} == {"a:1", "b:1"}  # new prefixes went to both
    assert (a.load, b.load) == (20, 20)


def test_prefix_policy_bounded_load_and_threshold():
    a, b = FakeReplica("a:1"), FakeReplica("b:1")
    pol = PrefixPolicy(load_factor=1.5)
    hashes = prompt_block_hashes(_prompt(0, 0), 16, 32)
    first = pol.pick([a, b], hashes)
    other = b if first is a else a
    first.load = 10  # overloaded: 11 > 1.5 * 11 / 2 and 10 more than the other
    assert pol.pick([a, b], hashes) is other
    first.load = 2  # below the slack: affinity wins
    assert pol.pick([a, b], prompt_block_hashes(_prompt(0, 1), 16, 32)) in (first, other)
    # a prompt sharing only its first block (a chat-template header) is a new prefix, not a hit
    pol2 = PrefixPolicy(cache_threshold=0.5)
    c, d = FakeReplica("c:1"), FakeReplica("d:1")
    p1 = [7] * 16 + [1] * 96
    p2 = [7] * 16 + [2] * 96
    r1 = pol2.pick([c, d], prompt_block_hashes(p1, 16, 32))
    r2 = pol2.pick([c, d], prompt_block_hashes(p2, 16, 32))
    assert r1 is not r2
    assert pol2.matched_blocks(r1.address, prompt_block_hashes(p2, 16, 32)) == 1
    # a replica that died forgets its prefixes
    pol2.forget(r1.address)
    assert pol2.matched_blocks(r1.address, prompt_block_hashes(p1, 16, 32)) == 0
    with pytest.raises(ValueError, match="load factor"):
        PrefixPolicy(load_factor=0.5)


def test_prefix_policy_table_is_bounded():
    pol = PrefixPolicy(max_entries=10)
    a = FakeReplica("a:1")
    for i in range(20):
        pol.pick([a], prompt_block_hashes([i] * 64, 16, 32))
    assert len(pol._owners) == 10 and pol._sizes["a:1"] == 10


def test_round_robin_and_least_load():
    reps = [FakeReplica("b:1"), FakeReplica("a:1"), FakeReplica("c:1")]
    rr = RoundRobinPolicy()
    assert [rr.pick(reps, []).address for _ in range(6)] == ["a:1", "b:1", "c:1"] * 2
    ll = LeastLoadPolicy()
    reps[0].load, reps[1].load, reps[2].load = 3, 1, 2
    assert ll.pick(reps, []).address == "a:1"
    reps[1].load = 3
    reps[2].load, reps[2].kv_usage = 3, 0.9
    assert ll.pick(reps, []).address in ("a:1", "b:1")
    assert make_policy("least-load").name == "least-load"
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


def test_address_parsing():
    assert parse_addresses("a:1, b:2,,a:1") == ["a:1", "b:2"]
    assert parse_addresses("[::1]:50051") == ["[::1]:50051"]
    for bad in ("", "a", "a:x", ":5"):
        with pytest.raises(ValueError):
            parse_addresses(bad)
    assert split_dns_target("pagedserve-replica.ns.svc:50051") == ("pagedserve-replica.ns.svc", 50051)
    with pytest.raises(ValueError, match="NAME:PORT"):
        split_dns_target("nohost")


def test_dns_discovery_follows_the_records_and_survives_a_failed_lookup():
    answers: list = [["10.0.0.1:50051"], OSError("SERVFAIL"), [], ["10.0.0.1:50051", "10.0.0.2:50051"]]
    seen: list[list[str]] = []

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("replicas", 50051)
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    async def go():
        d = DnsDiscovery("replicas:50051", 5.0, seen.append, resolve)
        await d.start()
        for _ in range(3):
            await d.refresh()
        await d.close()
        return d.addresses

    assert asyncio.run(go()) == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert seen == [["10.0.0.1:50051"], ["10.0.0.1:50051", "10.0.0.2:50051"]]


def test_dns_discovery_resolves_localhost():
    from gateway.routing.discovery import resolve_all

    found = asyncio.run(resolve_all("localhost", 50051))
    assert "127.0.0.1:50051" in found or "[::1]:50051" in found


def test_resume_only_what_replays_identically():
    from gateway.routing.resume import continuation, resumable

    greedy = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5, repetition_penalty=1.2, logprobs=2)
    assert resumable(greedy)
    rest = continuation(greedy, 7)
    assert (rest.max_tokens, rest.min_tokens, rest.temperature, rest.logprobs) == (13, 0, 0.0, 2)
    assert continuation(SamplingParams(temperature=0.0, max_tokens=None), 3).max_tokens is None
    for bad in (SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0.0, n=2),
                SamplingParams(temperature=0.0, stop=["\n"]), SamplingParams(temperature=0.0, presence_penalty=0.5),
                SamplingParams(temperature=0.0, frequency_penalty=0.5)):
        assert not resumable(bad), bad
