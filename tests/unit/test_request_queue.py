"""The waiting queues of engine_core/request_queue.py: FCFS and (priority, arrival) ordering."""
from __future__ import annotations

import pytest

from engine_core.request import Request
from engine_core.request_queue import (
    FCFSRequestQueue,
    PriorityRequestQueue,
    SchedulingPolicy,
    create_request_queue,
)
from engine_core.sampling_params import SamplingParams


def req(rid: str, priority: int = 0, arrival: float = 0.0) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=4), priority=priority, arrival_time=arrival)


def ids(q) -> list[str]:
    return [r.request_id for r in q]


def test_factory_picks_the_policy():
    assert isinstance(create_request_queue("fcfs"), FCFSRequestQueue)
    assert isinstance(create_request_queue(SchedulingPolicy.PRIORITY), PriorityRequestQueue)
    with pytest.raises(ValueError):
        create_request_queue("lifo")


def test_fcfs_ignores_priority_and_keeps_arrival_order():
    q = create_request_queue("fcfs")
    q.append(req("a", priority=5, arrival=1))
    q.append(req("b", priority=-5, arrival=2))
    q.appendleft(req("p", priority=9, arrival=0.5))  # preempted: front
    assert ids(q) == ["p", "a", "b"]
    assert q[0].request_id == "p" and q.popleft().request_id == "p"
    assert not q.outranks(req("x", priority=-100), q[0])


def test_priority_orders_by_priority_then_arrival():
    q = PriorityRequestQueue()
    for rid, prio, t in [("low-early", 5, 1.0), ("high-late", -1, 4.0), ("mid", 0, 2.0), ("high-early", -1, 3.0),
                         ("low-late", 5, 5.0)]:
        q.append(req(rid, prio, t))
    assert ids(q) == ["high-early", "high-late", "mid", "low-early", "low-late"]
    assert q[0].request_id == "high-early" and len(q) == 5 and q
    assert [q.popleft().request_id for _ in range(5)] == ["high-early", "high-late", "mid", "low-early", "low-late"]
    assert not q
    with pytest.raises(IndexError):
        q.popleft()


def test_priority_ties_of_equal_arrival_keep_insertion_order():
    q = PriorityRequestQueue()
    for rid in "abc":
        q.append(req(rid, 1, 7.0))
    assert ids(q) == ["a", "b", "c"]


def test_preempted_request_rejoins_ahead_of_later_arrivals_of_its_priority():
    q = PriorityRequestQueue()
    q.append(req("later", 0, 10.0))
    q.append(req("urgent", -1, 11.0))
    q.appendleft(req("preempted", 0, 1.0))  # arrived first: ahead of "later", behind "urgent"
    assert ids(q) == ["urgent", "preempted", "later"]


def test_remove_anywhere_by_identity():
    q = PriorityRequestQueue()
    rs = [req(f"r{i}", i % 2, float(i // 2)) for i in range(6)]  # equal keys pairwise across priorities
    twin = req("r0", 0, 0.0)  # same id and key, another object: not in the queue
    for r in rs:
        q.append(r)
    q.remove(rs[2])
    q.remove(rs[5])
    assert ids(q) == ["r0", "r4", "r1", "r3"]
    with pytest.raises(ValueError):
        q.remove(twin)
    assert rs[0] in q and twin not in q
    rs[4].priority = 9  # changed after queueing: still found
    q.remove(rs[4])
    assert ids(q) == ["r0", "r1", "r3"]


def test_outranks_is_strict_priority_and_running_order():
    q = PriorityRequestQueue()
    assert q.outranks(req("a", -1, 9.0), req("b", 0, 0.0))
    assert not q.outranks(req("a", 0, 0.0), req("b", 0, 9.0))  # equals never preempt each other
    running = [req("lo-old", 3, 1.0), req("hi", 0, 5.0), req("lo-new", 3, 2.0)]
    q.order_running(running)
    assert ids(running) == ["hi", "lo-old", "lo-new"]  # running[-1]: the one to preempt
