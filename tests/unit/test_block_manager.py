"""Block manager: unit tests plus a stateful model check against a shadow KV cache.

The shadow model stands in for the GPU: per block, the token id whose KV each slot holds. The
test plays scheduler + executor (allocate, apply CoW copies, write the scheduled positions), so
any sharing / eviction / copy-on-write mistake shows up as a slot holding the wrong token.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine_core.block_manager import NULL_BLOCK_ID, BlockManager, hash_block_tokens
from engine_core.request import Request
from engine_core.sampling_params import SamplingParams


def make_req(rid: str, prompt: list[int], output: list[int] | None = None) -> Request:
    return Request(rid, list(prompt), SamplingParams(), output_token_ids=list(output or []))


def first_schedule(bm: BlockManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """What the scheduler does on a request's first schedule; computes the whole rest by default."""
    hits, num_hit_tokens = bm.get_computed_blocks(req)
    n = req.num_tokens - num_hit_tokens if num_new is None else num_new
    ids = bm.allocate_slots(req, n, hits)
    if ids is not None:
        req.num_computed_tokens = num_hit_tokens + n
        req.num_cached_tokens = num_hit_tokens
    return ids


def decode(bm: BlockManager, req: Request, token: int) -> list[int] | None:
    """Sync decode step: sample `token` (append), then compute its KV."""
    req.output_token_ids.append(token)
    ids = bm.allocate_slots(req, req.num_tokens - req.num_computed_tokens)
    if ids is not None:
        req.num_computed_tokens = req.num_tokens
    return ids


def state(bm: BlockManager) -> tuple:
    """Everything allocate_slots may mutate (for the no-side-effect checks)."""
    return (
        [(b.ref_cnt, b.block_hash) for b in bm.blocks],
        [b.block_id for b in bm._free],
        list(bm._evictable),
        {h: b.block_id for h, b in bm._cached.items()},
        {r: [b.block_id for b in bs] for r, bs in bm._req_blocks.items()},
        dict(bm._num_cached_blocks),
        list(bm._pending_copies),
        {r: list(v) for r, v in bm._replaced.items()},
        bm.prefix_cache_queries,
        bm.prefix_cache_hits,
    )


# ---------------------------------------------------------------------------- unit tests
def test_allocation_sizes_and_usage():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.num_free_blocks == 9 and bm.usage == 0.0
    req = make_req("a", list(range(10)))
    ids = first_schedule(bm, req)
    assert len(ids) == 3 and NULL_BLOCK_ID not in ids
    assert bm.get_block_ids("a") == ids
    assert bm.num_free_blocks == 6 and bm.usage == pytest.approx(3 / 9)
    assert decode(bm, req, 100) == []  # 11 tokens: still 3 blocks
    assert decode(bm, req, 101) == []  # 12
    new = decode(bm, req, 102)  # 13 -> 4th block
    assert len(new) == 1 and bm.get_block_ids("a") == ids + new
    assert bm.get_block_ids("unknown") == []


def test_chunked_prefill_allocates_incrementally():
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_req("a", list(range(10)))
    assert len(first_schedule(bm, req, num_new=5)) == 2
    assert req.num_computed_tokens == 5
    assert len(bm.allocate_slots(req, 5)) == 1
    assert len(bm.get_block_ids("a")) == 3


def test_out_of_blocks_returns_none_without_side_effects():
    bm = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    a = make_req("a", [1] * 9)  # 3 blocks, 2 of them full (cached)
    first_schedule(bm, a)
    before = state(bm)
    assert bm.allocate_slots(make_req("b", [2] * 8), 8) is None
    assert state(bm) == before
    # Decode step that needs a 2nd block for a running request that has none to spare.
    c = make_req("c", [3] * 4)
    first_schedule(bm, c)
    c.output_token_ids.append(7)
    before = state(bm)
    assert bm.allocate_slots(c, 1) is None
    assert state(bm) == before

    # With prefix hits that sit in the evictable pool: they count as free blocks, and a failed
    # allocation must leave them evictable (not referenced).
    bm.free(a)
    bm.free(c)
    d = make_req("d", [1] * 8 + [5] * 9)
    hits, n = bm.get_computed_blocks(d)
    assert len(hits) == 2 and n == 8
    before = state(bm)
    assert bm.allocate_slots(d, d.num_tokens - n, hits) is None  # 2 evictable hits + 3 fresh > 4
    assert state(bm) == before
    assert all(bm.blocks[h].ref_cnt == 0 for h in hits)


def test_free_returns_blocks_and_is_idempotent():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_req("a", list(range(9))), make_req("b", [7, 7])
    first_schedule(bm, a)
    first_schedule(bm, b)
    assert bm.num_free_blocks == 7 - 4
    bm.free(a)
    assert bm.num_free_blocks == 7 - 1
    bm.free(a)  # idempotent
    bm.free(make_req("never-seen", [1]))
    assert bm.num_free_blocks == 6
    bm.free(b)
    assert bm.num_free_blocks == 7 and bm.usage == 0.0
    # The two full blocks of `a` stay cached (evictable); the rest went back to the free list.
    assert len(bm._evictable) == 2 and bm.num_cached_blocks == 2


def test_shared_prefix_hits_and_stats():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefix = list(range(12))  # 3 full blocks
    a = make_req("a", prefix + [50, 51])
    first_schedule(bm, a)
    a_ids = bm.get_block_ids("a")
    assert bm.prefix_cache_queries == 14 and bm.prefix_cache_hits == 0

    b = make_req("b", prefix + [60, 61, 62])
    hits, n = bm.get_computed_blocks(b)
    assert hits == a_ids[:3] and n == 12
    assert bm.prefix_cache_queries == 14 + 15 and bm.prefix_cache_hits == 12
    assert all(bm.blocks[h].ref_cnt == 1 for h in hits)  # no side effect on refs
    new = bm.allocate_slots(b, 3, hits)
    b.num_computed_tokens = 15
    assert new[:3] == hits and len(new) == 4
    assert all(bm.blocks[h].ref_cnt == 2 for h in hits)
    snap = bm.snapshot()
    assert snap[hits[0]] == (2, True, ("a", "b"))
    assert snap[new[3]] == (1, False, ("b",))

    # Still hits after both finish: the blocks moved to the evictable pool.
    bm.free(a)
    bm.free(b)
    c = make_req("c", prefix + [99])
    hits_c, n_c = bm.get_computed_blocks(c)
    assert hits_c == a_ids[:3] and n_c == 12
    assert bm.allocate_slots(c, 1, hits_c) is not None
    assert all(bm.blocks[h].ref_cnt == 1 for h in hits_c)
    assert not any(h in bm._evictable for h in hits_c)


def test_last_token_is_never_cached():
    bm = BlockManager(num_blocks=16, block_size=4)
    first_schedule(bm, make_req("a", list(range(9))))
    # Block-aligned prompt fully cached: the last block is given up so one token is computed.
    hits, n = bm.get_computed_blocks(make_req("b", list(range(8))))
    assert len(hits) == 1 and n == 4
    hits, n = bm.get_computed_blocks(make_req("c", list(range(4))))
    assert hits == [] and n == 0
    # One token past the cached blocks: both full blocks hit.
    hits, n = bm.get_computed_blocks(make_req("d", list(range(9))))
    assert len(hits) == 2 and n == 8


def test_only_known_tokens_are_cached():
    """Async scheduling: a slot whose token is still being sampled is computed but not known."""
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_req("a", [1, 2, 3])
    first_schedule(bm, req)  # computes 3 tokens, samples token 3 (in flight)
    bm.allocate_slots(req, 1)  # step N+1 computes the unknown token 3 -> block 0 "full"
    req.num_computed_tokens = 4
    blk = bm.get_block_ids("a")[0]
    assert bm.blocks[blk].block_hash is None and bm.num_cached_blocks == 0
    req.output_token_ids.append(9)  # step N's result arrives
    bm.allocate_slots(req, 1)  # step N+2
    req.num_computed_tokens = 5
    assert bm.blocks[blk].block_hash == hash_block_tokens(None, [1, 2, 3, 9])
    # Uncomputed known tokens (rest of a chunked prompt) are not cached either.
    p = make_req("p", list(range(20, 32)))
    first_schedule(bm, p, num_new=5)
    assert [bm.blocks[i].block_hash is not None for i in bm.get_block_ids("p")] == [True, False]


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_req("a", list(range(9)))
    first_schedule(bm, a)
    bm.free(a)
    assert bm.get_computed_blocks(make_req("b", list(range(9)))) == ([], 0)
    assert bm.num_cached_blocks == 0 and not bm._evictable and bm.snapshot() == {}
    assert bm.prefix_cache_queries == 0


def test_lru_evicts_least_recently_freed_tail_first():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable
    a = make_req("a", [1, 2, 3, 4, 5])  # blocks a0,a1 full (cached), a2 partial
    first_schedule(bm, a)
    a0, a1, a2 = bm.get_block_ids("a")
    bm.free(a)  # reverse order: a2 -> free list, then a1, a0 -> LRU (a1 oldest)
    assert list(bm._evictable) == [a1, a0]

    b = make_req("b", [7, 8, 9])  # 2 blocks: the never-used one and a2, no eviction
    first_schedule(bm, b)
    assert set(bm.get_block_ids("b")) == {a2, 4}  # block 4 was never used
    assert bm.num_cached_blocks == 3  # a0, a1 and b's full block [7, 8]

    c = make_req("c", [6])  # free list empty -> evicts a1 (tail of the older prefix)
    first_schedule(bm, c)
    assert bm.get_block_ids("c") == [a1]
    assert bm.blocks[a1].block_hash is None and bm.num_cached_blocks == 2
    # Chained hashes: the prefix's first block is still a hit, the second is gone.
    assert bm.get_computed_blocks(make_req("x", [1, 2, 3, 4, 0])) == ([a0], 2)
    d = make_req("d", [6])
    first_schedule(bm, d)
    assert bm.get_block_ids("d") == [a0] and bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(make_req("y", [1, 2, 3, 4, 0])) == ([], 0)
    assert bm.num_free_blocks == 0
    assert first_schedule(bm, make_req("e", [1])) is None


def test_duplicate_blocks_computed_independently():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = make_req("a", list(range(9))), make_req("b", list(range(9)))
    # Both looked up before either allocated (same scheduling pass): no hits for either.
    ha, _ = bm.get_computed_blocks(a)
    hb, _ = bm.get_computed_blocks(b)
    assert ha == hb == []
    first_schedule(bm, a)
    a_ids = bm.get_block_ids("a")
    assert bm.allocate_slots(b, 9, hb) is not None
    b.num_computed_tokens = 9
    # The first registration wins; b's copies stay unhashed and go to the free list when freed.
    assert bm.num_cached_blocks == 2
    assert all(bm.blocks[i].block_hash is None for i in bm.get_block_ids("b"))
    bm.free(b)
    assert len(bm._evictable) == 0
    assert bm.get_computed_blocks(make_req("c", list(range(9))))[0] == a_ids[:2]


def test_stale_hits_are_rejected():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    a = make_req("a", [1, 2, 3])
    first_schedule(bm, a)
    bm.free(a)
    b = make_req("b", [1, 2, 5])
    hits, _ = bm.get_computed_blocks(b)
    assert len(hits) == 1
    first_schedule(bm, make_req("c", [9, 9, 9, 9, 9]))  # 3 blocks: evicts the hit
    with pytest.raises(ValueError):
        bm.allocate_slots(b, 1, hits)


def test_fork_shares_blocks_and_cow_on_partial_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = make_req("p", [1, 2, 3, 4, 5, 6])
    first_schedule(bm, parent)
    parent.output_token_ids.append(7)  # first sampled token (the same for all n children here)
    p0, p1 = bm.get_block_ids("p")
    child = make_req("c", parent.prompt_token_ids, parent.output_token_ids)
    child.num_computed_tokens = parent.num_computed_tokens
    bm.fork(parent, child)
    assert bm.get_block_ids("c") == [p0, p1]
    assert bm.blocks[p0].ref_cnt == 2 and bm.blocks[p1].ref_cnt == 2
    assert bm.snapshot()[p1] == (2, False, ("p", "c"))

    # The child writes position 6 into the shared partial block p1 -> private copy.
    assert bm.allocate_slots(child, 1) == []  # nothing appended: p1 was replaced in place
    child.num_computed_tokens = 7
    (c1,) = set(bm.get_block_ids("c")) - {p0}
    assert bm.get_block_ids("c") == [p0, c1]
    assert bm.take_block_copies() == [(p1, c1)]
    assert bm.take_block_copies() == []
    assert bm.take_replaced_blocks("c") == [(1, c1)]
    assert bm.take_replaced_blocks("c") == []
    assert bm.blocks[p1].ref_cnt == 1 and bm.blocks[p0].ref_cnt == 2

    # The parent is now p1's only holder: it writes in place, no copy.
    assert bm.allocate_slots(parent, 1) == []
    parent.num_computed_tokens = 7
    assert bm.take_block_copies() == [] and bm.get_block_ids("p") == [p0, p1]

    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 9


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = make_req("p", [1, 2, 3, 4, 5, 6, 7, 8])
    first_schedule(bm, parent)
    parent.output_token_ids.append(9)
    child = make_req("c", parent.prompt_token_ids, parent.output_token_ids)
    child.num_computed_tokens = 8
    bm.fork(parent, child)
    new = bm.allocate_slots(child, 1)
    assert len(new) == 1 and bm.take_block_copies() == []
    assert bm.get_block_ids("c") == bm.get_block_ids("p") + new


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(9)))
    first_schedule(bm, a)
    assert bm.reset_prefix_cache() is False  # blocks in use
    assert bm.num_cached_blocks == 2
    bm.free(a)
    assert bm.reset_prefix_cache() is True
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 7 and not bm._evictable
    assert bm.get_computed_blocks(make_req("b", list(range(9)))) == ([], 0)


# ---------------------------------------------------------------------------- stateful model
BS = 4
NUM_BLOCKS = 10
MAX_LEN = 20
BASE = [0, 1, 2, 0, 1, 1, 2, 2, 0, 0, 1, 2, 2, 1, 0, 1]  # shared prefix source -> many collisions


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Sim:
    """One live request as the scheduler/executor pair sees it."""

    def __init__(self, req: Request):
        self.req = req
        self.pending: list[int] = []  # sampled, not yet revealed to the scheduler (async)
        self.table: list[int] = []  # the executor's mirror of the block table (built from deltas)
        self.running = False

    @property
    def true_seq(self) -> list[int]:
        return self.req.all_token_ids + self.pending


class BlockManagerMachine(RuleBasedStateMachine):
    prefix_caching = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=self.prefix_caching)
        # Shadow KV cache: the token id each slot holds (None: never written since allocation).
        self.shadow: dict[int, list[int | None]] = {b: [None] * BS for b in range(NUM_BLOCKS)}
        self.sims: dict[str, Sim] = {}
        self.hash_tokens: dict[bytes, tuple[int, ...]] = {}  # every full-block hash ever known
        self.n = 0

    # -- helpers
    def _new_id(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def _record_hashes(self, req: Request) -> None:
        toks, parent = req.all_token_ids, None
        for i in range(len(toks) // BS):
            blk = tuple(toks[i * BS : (i + 1) * BS])
            parent = hash_block_tokens(parent, blk)
            self.hash_tokens[parent] = blk

    def _reveal(self, sim: Sim) -> None:
        sim.req.output_token_ids.append(sim.pending.pop(0))
        self._record_hashes(sim.req)

    def _pick(self, data, pred) -> Sim | None:
        ids = sorted(r for r, s in self.sims.items() if pred(s))
        return self.sims[data.draw(st.sampled_from(ids))] if ids else None

    # -- rules
    @rule(k=st.integers(0, len(BASE)), tail=st.lists(st.integers(0, 2), max_size=10))
    def add_request(self, k: int, tail: list[int]) -> None:
        prompt = BASE[:k] + tail
        if not prompt:
            return
        req = make_req(self._new_id(), prompt)
        self.sims[req.request_id] = Sim(req)
        self._record_hashes(req)

    @precondition(lambda self: self.sims)
    @rule(data=st.data())
    def step(self, data) -> None:
        """One scheduler step: schedule a subset of the requests, in a random order."""
        ids = data.draw(st.permutations(sorted(self.sims)), label="order")
        for rid in ids[: data.draw(st.integers(1, len(ids)), label="how many")]:
            sim = self.sims[rid]
            if len(sim.pending) < 2 and (sim.running or not sim.pending):
                self._schedule(data, sim)

    def _schedule(self, data, sim: Sim) -> None:
        """One scheduling of a request: first schedule (with prefix lookup) or a later step
        (prefill chunk or decode), then the executor's side: copies, then KV writes."""
        bm, req = self.bm, sim.req
        seq = sim.true_seq
        if not sim.running:
            hits, num_hit = bm.get_computed_blocks(req)
            assert num_hit == len(hits) * BS < req.num_tokens  # >= 1 token left to compute
            assert NULL_BLOCK_ID not in hits
            for i, b in enumerate(hits):  # a hit must really hold this prefix
                assert self.shadow[b] == seq[i * BS : (i + 1) * BS]
            start = num_hit
        else:
            hits, start = [], req.num_computed_tokens
        if start >= len(seq):
            return  # reached MAX_LEN: nothing left to compute
        k = data.draw(st.integers(1, len(seq) - start), label="num_new_tokens")
        before = state(bm)
        new = bm.allocate_slots(req, k, hits)
        if new is None:
            assert state(bm) == before
            return
        assert new[: len(hits)] == hits
        fresh = new[len(hits) :]
        for idx, dst in bm.take_replaced_blocks(req.request_id):
            sim.table[idx] = dst
            fresh.append(dst)
        sim.table += new
        sim.running = True
        assert sim.table == bm.get_block_ids(req.request_id)
        assert len(sim.table) == cdiv(start + k, BS)
        # Executor: fresh blocks hold garbage, then CoW copies, then this step's KV writes.
        for b in fresh:
            self.shadow[b] = [None] * BS
        for src, dst in bm.take_block_copies():
            self.shadow[dst] = list(self.shadow[src])
        for p in range(start, start + k):
            self.shadow[sim.table[p // BS]][p % BS] = seq[p]
        req.num_computed_tokens = start + k
        if start + k == len(seq) and len(seq) < MAX_LEN:
            sim.pending.append(data.draw(st.integers(0, 2), label="sampled"))
            if data.draw(st.booleans(), label="sync"):
                self._reveal(sim)

    @precondition(lambda self: any(s.pending for s in self.sims.values()))
    @rule(data=st.data())
    def reveal(self, data) -> None:
        """A step's result arrives (async scheduling)."""
        self._reveal(self._pick(data, lambda s: s.pending))

    @precondition(lambda self: self.sims)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = self._pick(data, lambda s: s.running and not s.pending)
        if parent is None:
            return
        p = parent.req
        child = make_req(self._new_id(), p.prompt_token_ids, p.output_token_ids)
        child.num_computed_tokens = p.num_computed_tokens
        self.bm.fork(p, child)
        sim = Sim(child)
        sim.table, sim.running = list(parent.table), True
        self.sims[child.request_id] = sim

    @precondition(lambda self: self.sims)
    @rule(data=st.data())
    def preempt(self, data) -> None:
        """Preemption by recompute: wait for in-flight results, free, start over."""
        sim = self._pick(data, lambda s: s.running)
        if sim is None:
            return
        while sim.pending:
            self._reveal(sim)
        self.bm.free(sim.req)
        sim.req.num_computed_tokens = 0
        sim.table, sim.running = [], False

    @precondition(lambda self: self.sims)
    @rule(data=st.data())
    def finish_or_abort(self, data) -> None:
        sim = self._pick(data, lambda s: True)
        self.bm.free(sim.req)
        before = state(self.bm)
        self.bm.free(sim.req)  # idempotent
        assert state(self.bm) == before
        del self.sims[sim.req.request_id]

    @rule()
    def reset_prefix_cache(self) -> None:
        in_use = self.bm.num_used_blocks
        ok = self.bm.reset_prefix_cache()
        assert ok == (in_use == 0)
        if ok:
            assert self.bm.num_cached_blocks == 0

    # -- invariants
    @invariant()
    def blocks_are_accounted_for(self) -> None:
        bm = self.bm
        free = [b.block_id for b in bm._free]
        evictable = list(bm._evictable)
        in_use = [b.block_id for b in bm.blocks if b.ref_cnt > 0]
        all_ids = free + evictable + in_use
        assert sorted(all_ids) == list(range(1, NUM_BLOCKS))  # a partition: no leak, no dupes
        assert bm.num_free_blocks + len(in_use) == NUM_BLOCKS - 1
        assert bm.blocks[NULL_BLOCK_ID].ref_cnt == 0 and bm.blocks[NULL_BLOCK_ID].block_hash is None
        assert all(b.ref_cnt == 0 for b in bm._evictable.values())
        assert all(b.block_hash is None for b in bm._free)

    @invariant()
    def ref_counts_match_holders(self) -> None:
        holders = [0] * NUM_BLOCKS
        for rid, sim in self.sims.items():
            assert sim.table == self.bm.get_block_ids(rid)
            assert len(set(sim.table)) == len(sim.table) and NULL_BLOCK_ID not in sim.table
            for b in sim.table:
                holders[b] += 1
        assert [b.ref_cnt for b in self.bm.blocks] == holders
        for b, (ref_cnt, is_cached, rids) in self.bm.snapshot().items():
            assert ref_cnt == holders[b] == len(rids) and all(b in self.sims[r].table for r in rids)
            assert is_cached == (self.bm.blocks[b].block_hash is not None)

    @invariant()
    def computed_kv_is_intact(self) -> None:
        """Every computed slot of every running request holds its own token: sharing, CoW and
        eviction never clobbered it."""
        for sim in self.sims.values():
            seq = sim.true_seq
            for p in range(sim.req.num_computed_tokens):
                assert self.shadow[sim.table[p // BS]][p % BS] == seq[p]

    @invariant()
    def cache_map_is_truthful(self) -> None:
        bm = self.bm
        if not self.prefix_caching:
            assert not bm._cached and not bm._evictable
        for h, block in bm._cached.items():
            assert block.block_hash == h and block.block_id != NULL_BLOCK_ID
            assert h in self.hash_tokens, "hashed a block of unknown / partial tokens"
            assert tuple(self.shadow[block.block_id]) == self.hash_tokens[h]
        for block in bm.blocks:
            if block.block_hash is not None:
                assert bm._cached[block.block_hash] is block
        for sim in self.sims.values():  # lazily computed request hashes are correct
            toks = sim.req.all_token_ids
            parent = None
            for i, h in enumerate(sim.req.block_hashes):
                parent = hash_block_tokens(parent, toks[i * BS : (i + 1) * BS])
                assert h == parent


class BlockManagerNoPrefixCacheMachine(BlockManagerMachine):
    prefix_caching = False


_settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = _settings
TestBlockManagerNoPrefixCacheStateful = BlockManagerNoPrefixCacheMachine.TestCase
TestBlockManagerNoPrefixCacheStateful.settings = settings(_settings, max_examples=50)
