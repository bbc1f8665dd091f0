"""The scheduler's waiting queue, one class per scheduling policy (after vLLM v1's request_queue.py).

- `fcfs` (the default): first come, first served. A deque: requests are admitted in arrival order
  and a preempted request goes back to the front.
- `priority`: ordered by (priority, arrival time): a lower `priority` value is served first, ties in
  arrival order. A preempted request keeps its arrival time, so it sorts ahead of the later arrivals
  of its priority (the "front" of its class). Under this policy the scheduler also preempts running
  requests of a lower priority to admit a waiting one (engine_core/scheduler.py).

Both queues offer the deque operations the scheduler uses (append, appendleft, popleft, remove,
[0], len, iteration in admission order), so the scheduler's code is the same for both.
"""
from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from collections.abc import Iterator

from engine_core.request import Request


class SchedulingPolicy(str, enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"


def priority_key(req: Request) -> tuple[int, float]:
    """Sort key of the priority policy: smaller is served first (and preempted last)."""
    return req.priority, req.arrival_time


class FCFSRequestQueue(deque):
    """First come, first served: the scheduler's historical deque, unchanged."""

    policy = SchedulingPolicy.FCFS
    preempts_running = False  # a waiting request never displaces a running one

    def outranks(self, a: Request, b: Request) -> bool:
        """May waiting `a` preempt running `b` to be admitted? Never under FCFS."""
        return False

    def order_running(self, running: list[Request]) -> None:
        """FCFS keeps admission order (the latest admitted is preempted first)."""


class PriorityRequestQueue:
    """Waiting requests sorted by (priority, arrival time, insertion order).

    A sorted list rather than a heap: the scheduler peeks at [0], pops the head, removes aborted and
    timed-out requests anywhere, and the stats iterate in admission order. bisect keeps all of those
    simple; an insert is a memmove of a few thousand pointers at most (the queue is bounded by
    --max-queue-len)."""

    policy = SchedulingPolicy.PRIORITY
    preempts_running = True  # a higher-priority waiting request may (Scheduler._preempt_for)

    def __init__(self) -> None:
        self._keys: list[tuple[int, float, int]] = []
        self._reqs: list[Request] = []
        self._seq = itertools.count()  # ties of equal (priority, arrival): insertion order

    def append(self, req: Request) -> None:
        key = (*priority_key(req), next(self._seq))
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._reqs.insert(i, req)

    # A preempted request goes back by its key: it keeps its arrival time, so it precedes the
    # later arrivals of its priority (and a higher-priority newcomer still comes first).
    appendleft = append

    def insert(self, index: int, req: Request) -> None:
        """The scheduler puts a preempted request back at a position (FCFS: behind forked sequences
        waiting for admission); here the order is the key's, so the position is ignored."""
        self.append(req)

    def popleft(self) -> Request:
        if not self._reqs:
            raise IndexError("pop from an empty queue")
        self._keys.pop(0)
        return self._reqs.pop(0)

    def remove(self, req: Request) -> None:
        key = priority_key(req)
        i = bisect.bisect_left(self._keys, key)  # first entry of this (priority, arrival)
        for j in range(i, len(self._reqs)):
            if self._reqs[j] is req:
                del self._keys[j]
                del self._reqs[j]
                return
            if self._keys[j][:2] != key:
                break
        # The request's priority or arrival changed after it was queued (not done by the engine).
        j = next((j for j, r in enumerate(self._reqs) if r is req), None)
        if j is None:
            raise ValueError("request is not in the queue")
        del self._keys[j]
        del self._reqs[j]

    def __getitem__(self, i: int) -> Request:
        return self._reqs[i]

    def __len__(self) -> int:
        return len(self._reqs)

    def __bool__(self) -> bool:
        return bool(self._reqs)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._reqs)

    def __contains__(self, req: object) -> bool:
        return any(r is req for r in self._reqs)

    def outranks(self, a: Request, b: Request) -> bool:
        """May waiting `a` preempt running `b`? Only for a strictly higher priority (lower value):
        equals never preempt each other (that would thrash)."""
        return a.priority < b.priority

    def order_running(self, running: list[Request]) -> None:
        """Highest priority first, so that running[-1] is the one to preempt (the lowest priority,
        the latest arrival among equals) and high-priority requests get the step's budget first.
        Stable and nearly sorted already: cheap."""
        running.sort(key=priority_key)


RequestQueue = FCFSRequestQueue | PriorityRequestQueue


def create_request_queue(policy: SchedulingPolicy | str) -> RequestQueue:
    policy = SchedulingPolicy(policy)
    return PriorityRequestQueue() if policy == SchedulingPolicy.PRIORITY else FCFSRequestQueue()
