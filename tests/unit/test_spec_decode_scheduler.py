"""Scheduler bookkeeping under speculative decoding (no model): 1 + k scheduled tokens, rollback of
rejected positions, caps by max_tokens / max_model_len / budget, stops inside accepted tokens,
blocks, prefix caching of final tokens only, preemption mid-speculation."""
from __future__ import annotations

from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler
from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput


def make_sched(**kw) -> Scheduler:
    args = {"num_blocks": 64, "block_size": 4, "max_model_len": 64, "max_num_seqs": 8,
            "max_num_batched_tokens": 32, "enable_chunked_prefill": True, "enable_prefix_caching": False}
    args.update(kw)
    return Scheduler(**args)


def req(rid: str, n_prompt: int, max_tokens: int | None = 16, stop: tuple[int, ...] = ()) -> Request:
    return Request(rid, [100 + i for i in range(n_prompt)],
                   SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=list(stop)),
                   eos_token_ids=(9999,))


def result(so: SchedulerOutput, tokens: dict[str, list[int]], drafts: dict[str, list[int]] | None = None
           ) -> ModelRunnerOutput:
    out = ModelRunnerOutput(step_id=so.step_id)
    for rid in so.num_scheduled_tokens:
        out.req_ids.append(rid)
        out.sampled_token_ids.append(tokens.get(rid, []))
        out.logprobs.append(None)
        out.spec_token_ids.append((drafts or {}).get(rid, []))
    return out


def prefill(s: Scheduler, rid: str, first: int, drafts: list[int]) -> None:
    so = s.schedule()
    s.update_from_output(so, result(so, {rid: [first]}, {rid: drafts}))


def test_drafts_scheduled_and_rejected_positions_rolled_back():
    s = make_sched()
    s.add_request(req("a", 10))
    prefill(s, "a", 5, [6, 7, 8])
    r = s.requests["a"]
    assert (r.num_tokens, r.num_computed_tokens) == (11, 10)
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 4} and so.scheduled_spec_decode_tokens == {"a": [6, 7, 8]}
    assert so.total_num_scheduled_tokens == 4
    assert r.num_computed_tokens == 14 and r.spec_token_ids is None  # drafts consumed
    # Draft 6 accepted, 7 rejected -> the executor emits [6, 9]; drafts for the next step: [1, 2].
    (d,) = s.update_from_output(so, result(so, {"a": [6, 9]}, {"a": [1, 2]}))
    assert d.new_token_ids == [6, 9]
    assert r.output_token_ids == [5, 6, 9]
    assert r.num_computed_tokens == 12 == r.num_tokens - 1  # positions of 8 and the bonus: not computed
    assert r.spec_token_ids == [1, 2]
    so = s.schedule()
    assert so.scheduled_cached_reqs[0].num_computed_tokens == 12
    assert so.scheduled_spec_decode_tokens == {"a": [1, 2]}
    # All accepted + bonus.
    s.update_from_output(so, result(so, {"a": [1, 2, 3]}))
    assert r.output_token_ids == [5, 6, 9, 1, 2, 3] and r.num_computed_tokens == r.num_tokens - 1
    assert r.spec_token_ids is None
    assert s.schedule().num_scheduled_tokens == {"a": 1}  # no drafts: a plain decode


def test_drafts_capped_by_max_tokens_max_model_len_and_budget():
    s = make_sched()
    s.add_request(req("a", 10, max_tokens=3))
    prefill(s, "a", 5, [6, 7, 8, 9])
    so = s.schedule()  # 1 output so far, max 3: at most 1 draft (+1 bonus)
    assert so.scheduled_spec_decode_tokens == {"a": [6]} and so.num_scheduled_tokens == {"a": 2}
    (d,) = s.update_from_output(so, result(so, {"a": [6, 7]}))
    assert d.new_token_ids == [6, 7] and d.finish_reason == "length"
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks  # all blocks back

    s = make_sched(max_model_len=14)
    s.add_request(req("b", 10, max_tokens=None))
    prefill(s, "b", 5, [6, 7, 8, 9])
    so = s.schedule()  # 11 tokens, max_model_len 14: at most 2 drafts (14 - 11 - 1)
    assert so.scheduled_spec_decode_tokens == {"b": [6, 7]}
    (d,) = s.update_from_output(so, result(so, {"b": [6, 7, 8]}))
    assert d.finish_reason == "length" and s.requests.get("b") is None

    s = make_sched(max_num_batched_tokens=3)
    s.add_request(req("c", 3))
    prefill(s, "c", 5, [6, 7, 8, 9])
    assert s.schedule().scheduled_spec_decode_tokens == {"c": [6, 7]}  # budget 3 = 1 + 2 drafts


def test_stop_token_inside_accepted_drafts():
    s = make_sched()
    s.add_request(req("a", 6, stop=(7,)))
    prefill(s, "a", 5, [6, 7, 8])
    so = s.schedule()
    (d,) = s.update_from_output(so, result(so, {"a": [6, 7, 8, 4]}))
    assert d.new_token_ids == [6, 7] and d.finish_reason == "stop" and d.stop_reason == 7
    assert "a" not in s.requests and "a" in s.schedule().finished_req_ids
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_prefix_cache_registers_only_final_tokens():
    s = make_sched(enable_prefix_caching=True)
    s.add_request(req("a", 8))
    prefill(s, "a", 5, [6, 7, 8, 9])
    bm = s.block_manager
    assert bm.num_cached_blocks == 2  # the prompt's two full blocks
    so = s.schedule()  # positions 8..12: the tail block (8..11) would be full of drafts
    assert so.num_scheduled_tokens == {"a": 5}
    assert bm.num_cached_blocks == 2  # not registered: its tokens are drafts, not final
    s.update_from_output(so, result(so, {"a": [1]}))  # first draft rejected
    assert s.requests["a"].num_computed_tokens == 9
    for tok in (2, 3):
        so = s.schedule()
        s.update_from_output(so, result(so, {"a": [tok]}))
    so = s.schedule()  # computes position 11 -> block 2 = [5, 1, 2, 3] is final now
    assert bm.num_cached_blocks == 3


def test_preemption_mid_speculation_replays_from_tokens():
    # 7 usable blocks of 4: two requests of 10 prompt tokens (3 blocks each) + speculation overflow.
    s = make_sched(num_blocks=8, max_num_batched_tokens=64)
    s.add_request(req("a", 10))
    s.add_request(req("b", 10))
    so = s.schedule()
    s.update_from_output(so, result(so, {"a": [5], "b": [5]}, {"a": [6, 7, 8, 9], "b": [6, 7, 8, 9]}))
    so = s.schedule()  # a: 1 + 4 -> 15 tokens, 4 blocks; b cannot grow -> preempted
    assert so.scheduled_spec_decode_tokens == {"a": [6, 7, 8, 9]}
    b = s.waiting[0]
    assert b.request_id == "b" and b.status == RequestStatus.PREEMPTED
    assert b.spec_token_ids is None and b.num_computed_tokens == 0
    s.update_from_output(so, result(so, {"a": [6, 1]}, {"a": [2]}))
    a = s.requests["a"]
    assert a.num_computed_tokens == a.num_tokens - 1 == 12
    # b resumes with all of its tokens and no drafts.
    while not any(n.req_id == "b" for n in so.scheduled_new_reqs):
        s.update_from_output(so, result(so, {"a": [3]}))
        so = s.schedule()
        if s.requests.get("a") is None:
            break
    new_b = next(n for n in so.scheduled_new_reqs if n.req_id == "b")
    assert new_b.output_token_ids == [5] and "b" not in so.scheduled_spec_decode_tokens


def test_no_lookahead_is_never_a_reason_to_preempt():
    s = make_sched(num_blocks=4, num_lookahead_slots=8, max_model_len=12)  # 3 usable blocks = 12 slots
    s.add_request(req("a", 9, max_tokens=None))
    prefill(s, "a", 5, [6, 7])
    so = s.schedule()  # lookahead would need 15 slots; falls back to the 12 it can have
    assert so.scheduled_spec_decode_tokens == {"a": [6]} or so.scheduled_spec_decode_tokens == {"a": [6, 7]}
    assert s.num_preemptions == 0
