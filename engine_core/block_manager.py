"""Paged KV-cache block manager with prefix caching and copy-on-write (DESIGN.md §3).

Modelled on vLLM v1's KVCacheManager + BlockPool:

- The KV cache is split into fixed-size blocks; a request's *block table* lists the blocks that
  hold its tokens in order (token i lives in block_table[i // block_size], slot i % block_size).
- Blocks are reference counted. A block is shared by several requests when it is a prefix-cache
  hit or after `fork` (n>1 / beam search).
- Prefix cache: once a block is full of *known, computed* tokens it gets a chained hash
  (parent hash, its token ids) and is registered in `hash -> block`. When its last holder frees it,
  it keeps its hash and content and goes to an LRU "evictable" pool, so a later request with the
  same prefix can reuse it. Evictable blocks are reclaimed (hash dropped) only when the plain free
  list is empty.
- Copy-on-write: full shared blocks are never written, so only a shared block that a request is
  about to write into (its partial last block after a fork) must be replaced by a private copy.

Block 0 is a reserved null block: block tables are padded with it, so it is never handed out.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from engine_core.request import Request

NULL_BLOCK_ID = 0


@dataclass(eq=False)  # identity semantics: blocks are mutable pool entries, never compared by value
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # Set only while the block is registered in the prefix cache (hash -> block map).
    block_hash: bytes | None = None


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: equal hashes mean equal *prefixes*, not just equal blocks,
    because the parent's hash is folded in. Token ids are packed as little-endian int64 so the
    hash is stable across processes and Python versions (unlike hash() or pickle)."""
    h = hashlib.sha256(parent_hash or b"")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without building the whole list (that would cost
    O(sequence length) per call, and we call this on the decode hot path)."""
    prompt, out = request.prompt_token_ids, request.output_token_ids
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    if start >= p:
        return out[start - p : end - p]
    return prompt[start:] + out[: end - p]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0 and no hash. FIFO order is irrelevant for correctness.
        self._free: deque[KVCacheBlock] = deque(self.blocks[1:])
        # Blocks with ref_cnt 0 that still hold a cached prefix, least recently freed first.
        self._evictable: OrderedDict[int, KVCacheBlock] = OrderedDict()
        # Prefix cache. Holds in-use *and* evictable hashed blocks; first registration wins.
        self._cached: dict[bytes, KVCacheBlock] = {}

        self._req_blocks: dict[str, list[KVCacheBlock]] = {}
        # Per request: how many leading blocks have been offered to the prefix cache already,
        # so cache_full_blocks does O(new full blocks) work per call.
        self._num_cached_blocks: dict[str, int] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self._replaced: dict[str, list[tuple[int, int]]] = {}

        # Cumulative counters (Prometheus style: never reset), in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ accounting
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take: truly free plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    # ------------------------------------------------------------------ prefix cache
    def _update_block_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Extend request.block_hashes to cover its first num_full_blocks full blocks."""
        hashes, bs = request.block_hashes, self.block_size
        # Tokens may have been dropped (async scheduling trims an overshoot token): hashes of
        # blocks that are no longer full would be stale.
        del hashes[request.num_tokens // bs :]
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, _token_slice(request, i * bs, (i + 1) * bs)))

    def get_computed_blocks(self, request: Request, record_stats: bool = True) -> tuple[list[int], int]:
        """Longest cached prefix of the request's full blocks: (block_ids, num_computed_tokens).

        Takes no references: the caller must pass the ids to allocate_slots for this request
        before allocating for anyone else (an allocation may evict them). A scheduler that may
        retry the same request next step passes record_stats=False and calls
        record_prefix_cache_lookup once the request is admitted, so the hit rate counts it once."""
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = request.num_tokens
        # At least one token must be computed: its logits are what we sample from. So a fully
        # cached, block-aligned prompt gives up its last block.
        max_hit_blocks = max(num_tokens - 1, 0) // self.block_size
        self._update_block_hashes(request, max_hit_blocks)
        hit_ids: list[int] = []
        for h in request.block_hashes[:max_hit_blocks]:
            block = self._cached.get(h)
            if block is None:
                break  # chained hashes: a miss means no later block can match either
            hit_ids.append(block.block_id)
        num_hit_tokens = len(hit_ids) * self.block_size
        if record_stats:
            self.record_prefix_cache_lookup(num_tokens, num_hit_tokens)
        return hit_ids, num_hit_tokens

    def record_prefix_cache_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(
        self, request: Request, blocks: list[KVCacheBlock], num_computed: int
    ) -> None:
        """Register blocks that are full of tokens that are both computed (KV written by the end of
        the step being scheduled) and known (the slot of a token still being sampled is not)."""
        rid = request.request_id
        num_full = min(num_computed, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request, num_full)
        for i in range(start, num_full):
            block = blocks[i]
            if block.block_hash is not None:
                continue  # a prefix hit, or a forked block its other holder registered first
            h = request.block_hashes[i]
            if h not in self._cached:
                block.block_hash = h
                self._cached[h] = block
            # else: another request computed the same block independently; keep the first one
            # and leave this duplicate unhashed so it returns to the free list when released.
        self._num_cached_blocks[rid] = num_full

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix (e.g. after a weight update). Refused (False) while any block
        is in use, since running requests' blocks would otherwise keep stale hashes."""
        if self.num_used_blocks > 0:
            return False
        for block in self._evictable.values():
            block.block_hash = None
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()
        self._num_cached_blocks.clear()
        return True

    # ------------------------------------------------------------------ allocation
    def _pop_free_block(self) -> KVCacheBlock:
        if self._free:
            block = self._free.popleft()
        else:
            # Reclaim the least recently freed cached block; its prefix is no longer a hit.
            _, block = self._evictable.popitem(last=False)
            assert block.block_hash is not None and self._cached[block.block_hash] is block
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: list[int] | None = None
    ) -> list[int] | None:
        """Make room for num_computed_tokens + len(new_computed_block_ids) * block_size +
        num_new_tokens tokens. Returns the block ids appended to the request's table (cache hits
        first, then fresh blocks), or None, with no side effect at all, if blocks are short.
        Copy-on-write replacements are not appends: see take_block_copies/take_replaced_blocks."""
        bs, rid = self.block_size, request.request_id
        if num_new_tokens == 1 and not new_computed_block_ids:
            # Decode fast path (the common case, once per running request per step): the token's
            # slot is in a block we hold alone, so there is nothing to allocate or copy.
            blocks = self._req_blocks.get(rid)
            i = request.num_computed_tokens // bs
            if blocks is not None and i < len(blocks) and blocks[i].ref_cnt == 1:
                if self.enable_prefix_caching:
                    self.cache_full_blocks(request, blocks, request.num_computed_tokens + 1)
                return []
        hits = [self.blocks[i] for i in new_computed_block_ids or ()]
        blocks = self._req_blocks.get(rid, [])
        if hits:
            # Validate before any mutation, so a scheduler bug cannot corrupt the pool.
            if not self.enable_prefix_caching or blocks:
                raise ValueError("prefix-cache hits are only valid on a request's first allocation")
            if request.num_computed_tokens != 0:
                raise ValueError("num_computed_tokens must be 0 when passing prefix-cache hits")
            for i, block in enumerate(hits):
                if i >= len(request.block_hashes) or block.block_hash != request.block_hashes[i]:
                    raise ValueError(
                        f"block {block.block_id} is no longer a cache hit for {rid}: "
                        "allocate_slots must follow get_computed_blocks with no allocation between"
                    )

        num_computed = request.num_computed_tokens + len(hits) * bs
        num_total = num_computed + num_new_tokens
        num_required = _cdiv(num_total, bs)
        num_fresh = max(0, num_required - len(blocks) - len(hits))
        # Shared blocks this step writes into need a private copy first. Fully computed blocks
        # (index < num_computed // bs) are never written, so this is at most the partial tail.
        cow: list[int] = []
        if num_new_tokens > 0:
            write_range = range(num_computed // bs, min(len(blocks), num_required))
            cow = [i for i in write_range if blocks[i].ref_cnt > 1]
        # Hits with ref_cnt 0 sit in the evictable pool, i.e. they are counted as free blocks.
        num_needed = num_fresh + len(cow) + sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.num_free_blocks:
            return None

        # ---- commit: nothing below can fail ----
        for block in hits:  # first, so the fresh allocations below cannot evict them
            if block.ref_cnt == 0:
                del self._evictable[block.block_id]
            block.ref_cnt += 1
        for i in cow:
            src, dst = blocks[i], self._pop_free_block()
            src.ref_cnt -= 1  # stays >= 1: someone else still holds it
            blocks[i] = dst
            if i * bs < num_computed:  # it holds KV of ours that must survive
                self._pending_copies.append((src.block_id, dst.block_id))
            self._replaced.setdefault(rid, []).append((i, dst.block_id))
        fresh = [self._pop_free_block() for _ in range(num_fresh)]
        blocks.extend(hits)
        blocks.extend(fresh)
        self._req_blocks[rid] = blocks
        if self.enable_prefix_caching:
            self.cache_full_blocks(request, blocks, num_total)
        return [b.block_id for b in hits] + [b.block_id for b in fresh]

    def take_block_copies(self) -> list[tuple[int, int]]:
        """Pending copy-on-write copies (src, dst), to apply in order before the next forward."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def take_replaced_blocks(self, request_id: str) -> list[tuple[int, int]]:
        """Copy-on-write edits of this request's block table since the last call:
        (index in the table, new block id). The executor must apply them to its mirror table."""
        return self._replaced.pop(request_id, [])

    # ------------------------------------------------------------------ release / sharing
    def free(self, request: Request) -> None:
        rid = request.request_id
        self._num_cached_blocks.pop(rid, None)
        self._replaced.pop(rid, None)
        blocks = self._req_blocks.pop(rid, None)
        if blocks is None:
            return
        # Reverse order: a prefix's tail blocks enter the LRU first and so are evicted first,
        # keeping the more widely shared head blocks cached longest.
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self._evictable[block.block_id] = block
                else:
                    self._free.append(block)

    def fork(self, parent: Request, child: Request) -> None:
        """Child shares all of the parent's blocks (n>1 / beam search). The child must hold the
        same tokens and num_computed_tokens as the parent, and the parent no in-flight tokens."""
        if child.request_id in self._req_blocks:
            raise ValueError(f"fork: child {child.request_id} already holds blocks")
        blocks = self._req_blocks.get(parent.request_id)
        if not blocks:
            return
        # Only the blocks holding the child's computed tokens (a parent may already own more).
        blocks = blocks[: _cdiv(child.num_computed_tokens, self.block_size)]
        for block in blocks:
            block.ref_cnt += 1
        self._req_blocks[child.request_id] = list(blocks)
        num_cached = self._num_cached_blocks.get(parent.request_id, 0)
        self._num_cached_blocks[child.request_id] = min(num_cached, len(blocks))
        if not child.block_hashes:
            child.block_hashes = list(parent.block_hashes)

    # ------------------------------------------------------------------ observability
    def snapshot(self) -> dict[int, tuple[int, bool, tuple[str, ...]]]:
        """block_id -> (ref_cnt, is_cached, ids of requests holding it), for blocks that are in
        use or cached. Blocks not listed are free."""
        holders: defaultdict[int, list[str]] = defaultdict(list)
        for rid, blocks in self._req_blocks.items():
            for block in blocks:
                holders[block.block_id].append(rid)
        return {
            b.block_id: (b.ref_cnt, b.block_hash is not None, tuple(holders.get(b.block_id, ())))
            for b in self.blocks[1:]
            if b.ref_cnt > 0 or b.block_hash is not None
        }
