"""Scheduler behaviour without a model: token budget, chunked prefill, FCFS, preemption, deltas."""
from __future__ import annotations

from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler
from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput


def make_sched(**kw) -> Scheduler:
    args = {"num_blocks": 64, "block_size": 4, "max_model_len": 64, "max_num_seqs": 8,
            "max_num_batched_tokens": 16, "enable_chunked_prefill": True, "enable_prefix_caching": False}
    args.update(kw)
    return Scheduler(**args)


def req(rid: str, n_prompt: int, max_tokens: int = 4, base: int = 0) -> Request:
    return Request(rid, [base + i for i in range(n_prompt)], SamplingParams(temperature=0, max_tokens=max_tokens),
                   eos_token_ids=(9999,))


def fake_run(so: SchedulerOutput, sched: Scheduler, token: int = 7) -> ModelRunnerOutput:
    """Samples `token` for every request whose known tokens are all computed after this step."""
    out = ModelRunnerOutput(step_id=so.step_id)
    for rid in so.num_scheduled_tokens:
        r = sched.requests[rid]
        out.req_ids.append(rid)
        out.sampled_token_ids.append([token] if r.num_computed_tokens == r.num_tokens else [])
        out.logprobs.append(None)
    return out


def test_budget_shared_and_chunked_prefill():
    s = make_sched()
    s.add_request(req("a", 10))
    s.add_request(req("b", 10))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 10, "b": 6}  # b's prefill chunked by the budget
    assert [n.req_id for n in so.scheduled_new_reqs] == ["a", "b"]
    assert so.scheduled_new_reqs[0].block_ids == s.block_manager.get_block_ids("a")
    deltas = s.update_from_output(so, fake_run(so, s))
    assert [d.request_id for d in deltas] == ["a"]  # b is mid-prefill: nothing sampled
    so2 = s.schedule()
    # a decodes 1, b finishes its prompt with the remaining 4 -> both are cached (delta) requests.
    assert so2.num_scheduled_tokens == {"a": 1, "b": 4}
    assert not so2.scheduled_new_reqs
    cached = {c.req_id: c for c in so2.scheduled_cached_reqs}
    assert cached["b"].num_computed_tokens == 6 and cached["b"].new_block_ids  # 10 tokens need a 3rd block


def test_fcfs_and_max_num_seqs():
    s = make_sched(max_num_seqs=2, max_num_batched_tokens=64)
    for r in "abc":
        s.add_request(req(r, 4))
    so = s.schedule()
    assert set(so.num_scheduled_tokens) == {"a", "b"}
    assert [r.request_id for r in s.waiting] == ["c"]


def test_finish_by_length_and_eos_frees_blocks():
    s = make_sched()
    s.add_request(req("a", 4, max_tokens=2))
    for _ in range(2):  # prefill (samples token 1), then one decode (token 2)
        so = s.schedule()
        deltas = s.update_from_output(so, fake_run(so, s))
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 2
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks
    so = s.schedule()
    assert "a" in so.finished_req_ids  # the executor is told to drop it

    s.add_request(req("e", 4, max_tokens=10))
    so = s.schedule()
    d = s.update_from_output(so, fake_run(so, s, token=9999))
    assert d[0].finish_reason == "stop"


def test_preemption_by_recompute_goes_to_front_and_resends_tokens():
    # 6 usable blocks of 4 tokens: two requests of 8 prompt tokens use 4; decoding grows them until
    # the later one must be preempted.
    s = make_sched(num_blocks=7, max_num_batched_tokens=64, max_model_len=24)
    s.add_request(req("a", 8, max_tokens=12))
    s.add_request(req("b", 8, max_tokens=12, base=100))
    preempted_step = None
    for step in range(40):
        so = s.schedule()
        if so.is_empty:
            break
        if s.num_preemptions and preempted_step is None:
            preempted_step = step
            assert "b" in so.finished_req_ids and s.waiting[0].request_id == "b"
            assert s.requests["b"].status == RequestStatus.PREEMPTED
        resumed = [n for n in so.scheduled_new_reqs if n.req_id == "b" and n.output_token_ids]
        if resumed:  # resumed: the executor gets prompt + generated tokens to recompute
            assert resumed[0].num_computed_tokens == 0
            assert so.num_scheduled_tokens["b"] == 8 + len(resumed[0].output_token_ids)
        s.update_from_output(so, fake_run(so, s))
    assert preempted_step is not None
    assert not s.has_unfinished_requests()
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_abort_frees_and_notifies_executor():
    s = make_sched()
    s.add_request(req("a", 8))
    so = s.schedule()
    s.update_from_output(so, fake_run(so, s))
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks
    assert "a" in s.schedule().finished_req_ids
    assert s.finished_by_reason == {"abort": 1}


def test_replay_after_executor_restart_keeps_tokens():
    s = make_sched()
    s.add_request(req("a", 8, max_tokens=10))
    for _ in range(3):
        so = s.schedule()
        s.update_from_output(so, fake_run(so, s))
    generated = list(s.requests["a"].output_token_ids)
    s.requests_for_replay()
    so = s.schedule()
    new = so.scheduled_new_reqs[0]
    assert new.output_token_ids == generated and new.num_computed_tokens == 0
    assert s.num_preemptions == 0


def sampled(so: SchedulerOutput, token: int) -> ModelRunnerOutput:
    """One token for every request of the step (what an executor returns for decode steps)."""
    ids = list(so.num_scheduled_tokens)
    return ModelRunnerOutput(step_id=so.step_id, req_ids=ids, sampled_token_ids=[[token]] * len(ids),
                             logprobs=[None] * len(ids))


def test_async_placeholders_schedule_ahead_and_stop_exactly():
    """Step N+1 is scheduled before step N's result: the request's next slot is a placeholder;
    max_tokens is known ahead, so no step is scheduled past it."""
    s = make_sched()
    s.add_request(req("a", 4, max_tokens=2))
    so0 = s.schedule()
    assert so0.num_scheduled_tokens == {"a": 4}
    so1 = s.schedule()  # before so0's result: decode of the token so0 is sampling
    assert so1.num_scheduled_tokens == {"a": 1}
    assert s.requests["a"].num_output_placeholders == 2
    assert s.schedule().is_empty  # a will have 2 = max_tokens tokens once both land
    assert s.update_from_output(so0, sampled(so0, 7))[0].new_token_ids == [7]
    d = s.update_from_output(so1, sampled(so1, 8))
    assert d[0].new_token_ids == [8] and d[0].finish_reason == "length"
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_async_stale_result_after_preemption_is_ignored():
    s = make_sched()
    s.add_request(req("a", 4))
    so0 = s.schedule()
    a = s.requests["a"]
    s.requests_for_replay()  # e.g. an executor restart while so0 was in flight
    so1 = s.schedule()  # re-admitted from its tokens
    assert [n.req_id for n in so1.scheduled_new_reqs] == ["a"] and a.admitted_step == so1.step_id
    assert s.update_from_output(so0, sampled(so0, 7)) == []  # from before the replay: dropped
    assert a.output_token_ids == [] and a.num_output_placeholders == 1


def test_admission_batching_while_decoding():
    s = make_sched(max_num_seqs=32, max_num_batched_tokens=64, max_admission_delay_steps=3)
    s.add_request(req("a", 4, max_tokens=50))
    so = s.schedule()  # idle engine: admitted at once
    assert "a" in so.num_scheduled_tokens
    s.update_from_output(so, fake_run(so, s))
    s.add_request(req("b", 4, max_tokens=50, base=100))
    waits = 0
    while "b" not in (so := s.schedule()).num_scheduled_tokens:
        s.update_from_output(so, fake_run(so, s))
        waits += 1
    assert waits == 3  # a single newcomer waits for company, at most 3 steps
    s.update_from_output(so, fake_run(so, s))
    s.add_request(req("c", 4, max_tokens=50, base=200))
    s.add_request(req("d", 4, max_tokens=50, base=300))
    assert {"c", "d"} <= set(s.schedule().num_scheduled_tokens)  # 2 = 32 // 16 waiting: a batch
