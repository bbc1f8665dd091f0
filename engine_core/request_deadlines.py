"""Per-request deadlines (GenerateRequest.timeout_s / --request-timeout): a min-heap, checked once
per engine step, so the cost is O(log n) per request plus one peek per step, never per token.

Entries of requests that finished before their deadline are left in the heap (lazy deletion) and
dropped when they surface; the heap is rebuilt when such dead entries outnumber the live ones, so
its size stays within a small factor of the unfinished requests.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from engine_core.request import Request


@dataclass
class RequestDeadlines:
    _heap: list[tuple[float, int, Request]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)  # ties; Requests do not compare

    def add(self, req: Request) -> None:
        if req.deadline is not None:
            heapq.heappush(self._heap, (req.deadline, next(self._seq), req))

    def expired(self, now: float, num_unfinished: int) -> list[Request]:
        """Unfinished requests whose deadline is <= now, earliest first (removed from the heap)."""
        heap = self._heap
        out: list[Request] = []
        while heap and heap[0][0] <= now:
            req = heapq.heappop(heap)[2]
            if not req.status.finished:
                out.append(req)
        if len(heap) > 2 * num_unfinished + 64:  # mostly finished requests: compact
            self._heap = [e for e in heap if not e[2].status.finished]
            heapq.heapify(self._heap)
        return out

    def __len__(self) -> int:
        return len(self._heap)
