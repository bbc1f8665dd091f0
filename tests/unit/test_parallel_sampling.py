"""n > 1 and best_of on forked block tables (engine_core/sequence_group.py): the prompt is
prefilled once, the samples share its full blocks (ref counts) and copy only the partial last
block; outputs equal independent seeded requests (so the copy-on-write copies are right); finishing,
aborting, preemption and executor replay leak no block."""
from __future__ import annotations

import pytest

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams
from tests.unit.executor_faults import FailOnce

BS = 16
PROMPT_LEN = 500


def _prompt(llm: LLM) -> list[int]:
    text = ("A paged KV cache stores keys and values in fixed-size blocks so that many sequences "
            "share memory without fragmentation. ") * 40
    return llm.tokenizer.encode(text)[:PROMPT_LEN]


def _params(n: int = 4, max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.9, seed=1234, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run_tracking_peak(llm: LLM, prompt, params) -> tuple[list[list[int]], int]:
    eng, bm = llm.engine, llm.engine.core.scheduler.block_manager
    eng.add_request("r", prompt, params)
    peak, out = 0, None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
        peak = max(peak, bm.num_used_blocks)
    return [c.token_ids for c in out.outputs], peak


def _independent(llm: LLM, prompt, params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([prompt] * params.n, [params.for_child(i) for i in range(params.n)], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm():  # prefix caching off: every shared block is the fork's doing
    return LLM(max_model_len=1024, num_gpu_blocks_override=400, enable_prefix_caching=False)


def test_n4_prefills_once_and_shares_the_prompt_blocks(llm):
    prompt = _prompt(llm)
    assert len(prompt) == PROMPT_LEN
    got, peak = _run_tracking_peak(llm, prompt, _params())
    # 31 full blocks held once + the partial block (tokens 496..507), one private copy per sample.
    assert peak == PROMPT_LEN // BS + 4
    assert llm.engine.core.scheduler.block_manager.num_used_blocks == 0
    # Independent requests: 4 x 32 blocks. Same tokens: the forked children computed right.
    assert got == _independent(llm, prompt, _params())
    assert llm.engine.core.scheduler.block_manager.num_used_blocks == 0


def test_fork_at_block_boundary(llm):
    prompt = _prompt(llm)[:16 * 5 + 1]  # L-1 = 80 tokens: 5 full blocks, the last token starts a block
    got, peak = _run_tracking_peak(llm, prompt, _params(n=3))
    assert peak == 5 + 3
    assert got == _independent(llm, prompt, _params(n=3))


def test_abort_one_child_and_whole_request_leak_nothing(llm):
    eng, bm = llm.engine, llm.engine.core.scheduler.block_manager
    prompt = _prompt(llm)[:100]
    # Before the fork: one child, then the rest.
    eng.add_request("a", prompt, _params(max_tokens=30))
    eng.core.abort_requests(["a-1"])
    for _ in range(3):
        eng.step()
    eng.abort_request("a")
    while eng.has_unfinished_requests():
        eng.step()
    assert bm.num_used_blocks == 0
    # After the fork, mid-decode.
    eng.add_request("b", prompt, _params(max_tokens=30))
    outs = []
    for i in range(8):
        outs += eng.step()
        if i == 4:
            eng.core.abort_requests(["b-2"])
    eng.abort_request("b")
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert bm.num_used_blocks == 0
    assert {o.finish_reason for o in outs[-1].outputs} == {"abort"}


def test_preemption_leaks_nothing_and_keeps_tokens(llm):
    prompt = _prompt(llm)[:200]
    want = _independent(llm, prompt, _params(max_tokens=40))
    # 12 full prompt blocks + 4 x 3 private blocks > 20: children get preempted (and recomputed).
    small = LLM(max_model_len=256, num_gpu_blocks_override=21, enable_prefix_caching=False)
    got, _peak = _run_tracking_peak(small, prompt, _params(max_tokens=40))
    sched = small.engine.core.scheduler
    assert sched.num_preemptions > 0
    assert got == want
    assert sched.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("fail_at", [2, 6])  # the forking step, mid-decode
def test_executor_failure_replays_forked_children(llm, fail_at):
    prompt = _prompt(llm)[:60]
    want = _independent(llm, prompt, _params(max_tokens=12))
    core = llm.engine.core
    inner, restarts = core.executor, core.counters.executor_restarts
    core.executor = FailOnce(inner, fail_at)
    try:
        got = [c.token_ids for c in llm.generate([prompt], _params(max_tokens=12), use_tqdm=False)[0].outputs]
    finally:
        core.executor = inner
    assert core.counters.executor_restarts == restarts + 1
    assert got == want
    assert core.scheduler.block_manager.num_used_blocks == 0


def test_best_of_returns_the_n_most_likely(llm):
    prompt = _prompt(llm)[:40]
    all4 = llm.generate([prompt], _params(n=4, logprobs=0), use_tqdm=False)[0].outputs
    ranked = sorted(all4, key=lambda o: -o.cumulative_logprob)
    best = llm.generate([prompt], _params(n=2, best_of=4), use_tqdm=False)[0].outputs
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked[:2]]
    assert [o.index for o in best] == [0, 1] and all(o.logprobs is None for o in best)
    assert best[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=1e-4)
    assert llm.engine.core.scheduler.block_manager.num_used_blocks == 0
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)


def test_prefix_caching_on_shares_too():
    llm = LLM(max_model_len=1024, num_gpu_blocks_override=400, enable_prefix_caching=True)
    prompt = _prompt(llm)
    got, peak = _run_tracking_peak(llm, prompt, _params())
    assert peak == PROMPT_LEN // BS + 4
    # Children report the prefill's prefix-cache hit; a second identical request hits the cache.
    out = llm.generate([prompt], _params(), use_tqdm=False)[0]
    assert out.num_cached_tokens >= (PROMPT_LEN // BS - 1) * BS
    assert [c.token_ids for c in out.outputs] == got


def test_fork_contract_round_trips_through_the_step_proto():
    """CoW copies and block-table replacements reach a remote executor unchanged; group params too."""
    from engine_core.scheduler_output import CachedRequestData, SchedulerOutput
    from services import convert

    so = SchedulerOutput(step_id=3, scheduled_cached_reqs=[CachedRequestData("a", [9], 17, [(1, 12)])],
                         num_scheduled_tokens={"a": 1}, total_num_scheduled_tokens=1, block_copies=[(5, 12)])
    back = convert.scheduler_output_from_proto(convert.scheduler_output_to_proto(so))
    assert back.block_copies == [(5, 12)]
    assert back.scheduled_cached_reqs[0].replaced_blocks == [(1, 12)]
    sp = SamplingParams(n=3, best_of=5, use_beam_search=False, length_penalty=0.5, early_stopping=True)
    assert convert.sampling_params_from_proto(convert.sampling_params_to_proto(sp)) == sp
