"""Scheduling policy "priority" in the scheduler (no model): (priority, arrival) admission order,
preemption of the lowest-priority running request for a waiting higher-priority one (no sequence
slot, or no KV blocks) and under KV pressure; "fcfs" stays as it was."""
from __future__ import annotations

from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler
from tests.unit.test_scheduler import fake_run


def make_sched(policy: str = "priority", **kw) -> Scheduler:
    args = {"num_blocks": 64, "block_size": 4, "max_model_len": 64, "max_num_seqs": 8,
            "max_num_batched_tokens": 64, "enable_chunked_prefill": True, "enable_prefix_caching": False,
            "scheduling_policy": policy}
    args.update(kw)
    return Scheduler(**args)


def req(rid: str, n_prompt: int = 4, priority: int = 0, arrival: float = 0.0, max_tokens: int = 20,
        base: int = 0) -> Request:
    return Request(rid, [base + i for i in range(n_prompt)], SamplingParams(temperature=0, max_tokens=max_tokens),
                   eos_token_ids=(9999,), priority=priority, arrival_time=arrival)


def step(s: Scheduler):
    so = s.schedule()
    s.update_from_output(so, fake_run(so, s))
    return so


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    s = make_sched(max_num_seqs=1)
    for rid, prio, t in [("late-low", 3, 1.0), ("mid", 1, 2.0), ("early-low", 3, 0.5), ("high", 0, 3.0)]:
        s.add_request(req(rid, priority=prio, arrival=t, max_tokens=1))
    order = []
    while s.has_unfinished_requests():
        so = step(s)
        order += [n.req_id for n in so.scheduled_new_reqs]
    assert order == ["high", "mid", "early-low", "late-low"]
    assert s.num_preemptions == 0


def test_high_priority_takes_the_slot_of_the_lowest_running_latest_arrival():
    s = make_sched(max_num_seqs=2)
    s.add_request(req("low-a", priority=5, arrival=1.0))
    s.add_request(req("low-b", priority=5, arrival=2.0, base=100))
    step(s)
    step(s)  # both decoding
    s.add_request(req("high", priority=0, arrival=3.0, base=200))
    so = s.schedule()
    assert [n.req_id for n in so.scheduled_new_reqs] == ["high"]
    # low-b (latest arrival among the lowest) was scheduled for a decode first, then taken back out.
    assert set(so.num_scheduled_tokens) == {"low-a", "high"}
    assert [c.req_id for c in so.scheduled_cached_reqs] == ["low-a"]
    assert "low-b" in so.finished_req_ids  # the executor drops its state
    b = s.requests["low-b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_output_placeholders == 0
    assert [r.request_id for r in s.waiting] == ["low-b"] and s.num_preemptions == 1
    assert so.total_num_scheduled_tokens == 1 + 4
    s.update_from_output(so, fake_run(so, s))
    # low-b resumes (recomputed from its tokens) once a slot frees up; everything finishes.
    while s.has_unfinished_requests():
        step(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_high_priority_preempts_for_kv_blocks():
    # 6 usable blocks of 4 tokens: "low" holds 5 (20 tokens); "high" needs 2 for its 8 tokens.
    s = make_sched(num_blocks=7, max_model_len=40)
    s.add_request(req("low", n_prompt=18, priority=1, max_tokens=20))
    step(s)
    s.add_request(req("high", n_prompt=8, priority=0, arrival=1.0, base=100))
    so = s.schedule()
    assert [n.req_id for n in so.scheduled_new_reqs] == ["high"]
    assert "low" not in so.num_scheduled_tokens and "low" in so.finished_req_ids
    assert s.requests["low"].status == RequestStatus.PREEMPTED


def test_equal_priority_never_preempts():
    s = make_sched(max_num_seqs=1)
    s.add_request(req("a", priority=2, arrival=1.0))
    step(s)
    s.add_request(req("b", priority=2, arrival=0.0))  # even an earlier arrival: same class
    so = s.schedule()
    assert set(so.num_scheduled_tokens) == {"a"} and s.num_preemptions == 0


def test_lower_priority_newcomer_waits():
    s = make_sched(max_num_seqs=1)
    s.add_request(req("a", priority=0))
    step(s)
    s.add_request(req("b", priority=1, arrival=1.0))
    assert set(s.schedule().num_scheduled_tokens) == {"a"} and s.num_preemptions == 0


def _kv_pressure_victim(policy: str) -> str:
    """"low" is admitted first, "high" later; then decoding runs the 6 usable blocks out."""
    s = make_sched(policy, num_blocks=7, max_model_len=24)
    s.add_request(req("low", n_prompt=8, priority=1 if policy == "priority" else 0, max_tokens=12))
    step(s)
    s.add_request(req("high", n_prompt=8, priority=0, arrival=1.0, max_tokens=12, base=100))
    for _ in range(40):
        so = s.schedule()
        if s.num_preemptions:
            (victim,) = so.finished_req_ids
            return victim
        s.update_from_output(so, fake_run(so, s))
    raise AssertionError("no preemption")


def test_kv_pressure_victim_is_the_lowest_priority():
    assert _kv_pressure_victim("priority") == "low"
    assert _kv_pressure_victim("fcfs") == "high"  # fcfs: the latest admitted, as before


def test_fcfs_ignores_priority_and_never_preempts_for_it():
    s = make_sched("fcfs", max_num_seqs=2)
    s.add_request(req("low-a", priority=5))
    s.add_request(req("low-b", priority=5, base=100))
    step(s)
    s.add_request(req("high", priority=-5, base=200))
    s.add_request(req("later", priority=-9, base=300))
    so = s.schedule()
    assert set(so.num_scheduled_tokens) == {"low-a", "low-b"} and s.num_preemptions == 0
    assert [r.request_id for r in s.waiting] == ["high", "later"]  # arrival order


def test_high_priority_first_token_before_queued_low_ones():
    """A saturated engine (every slot busy, a queue of low-priority requests): a high-priority
    arrival gets its first token in the next step, ahead of every queued low one."""
    s = make_sched(max_num_seqs=2)
    for i in range(6):
        s.add_request(req(f"low{i}", priority=1, arrival=float(i), base=10 * i))
    step(s)
    s.add_request(req("high", priority=0, arrival=10.0, base=500))
    first: dict[str, int] = {}
    n = 0
    while s.has_unfinished_requests():
        so = s.schedule()
        for d in s.update_from_output(so, fake_run(so, s)):
            if d.new_token_ids:
                first.setdefault(d.request_id, n)
        n += 1
    assert first["high"] == 0
    queued = [f"low{i}" for i in range(2, 6)]
    assert all(first[q] > first["high"] for q in queued)
