"""Priorities and timeouts in the in-process engine on the real SmolLM2 (CPU): a high-priority
request sent into a saturated engine gets its first token before the queued low-priority ones, and
the low-priority request preempted for it still produces exactly its greedy tokens; LLM.generate's
priority list; a timeout (fake clock, asserted in steps) ends a request with its tokens so far."""
from __future__ import annotations

import pytest

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The best way to learn is",
           "Water boils at", "My favourite colour is", "In 1969, the first"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256, kv_cache_memory_gb=0.1, seed=0, max_num_seqs=2, scheduling_policy="priority")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_high_priority_first_token_before_queued_low_ones(llm):
    eng = llm.engine
    sched = eng.core.scheduler
    solo = {p: o.outputs[0].token_ids for p, o in zip(PROMPTS[:2], llm.generate(PROMPTS[:2], greedy(12),
                                                                                 use_tqdm=False))}
    preemptions = sched.num_preemptions
    first_step: dict[str, int] = {}
    outs = {}
    step = 0

    def run_step() -> None:
        nonlocal step
        for o in eng.step():
            if o.outputs[0].token_ids:
                first_step.setdefault(o.request_id, step)
            if o.finished:
                outs[o.request_id] = o
        step += 1

    eng.add_request("low0", PROMPTS[0], greedy(12), priority=5)
    eng.add_request("low1", PROMPTS[1], greedy(12), priority=5)
    while len(first_step) < 2:  # both slots busy
        run_step()
    for i, p in enumerate(PROMPTS[2:6]):
        eng.add_request(f"queued{i}", p, greedy(3), priority=5)
    eng.add_request("high", PROMPTS[6], greedy(3), priority=0)
    while eng.has_unfinished_requests():
        run_step()
    assert all(first_step["high"] < first_step[f"queued{i}"] for i in range(4)), first_step
    assert sched.num_preemptions > preemptions  # low1 (latest arrival of the lowest) made room
    # Preempted and recomputed: still exactly the tokens it gets alone.
    assert outs["low0"].outputs[0].token_ids == solo[PROMPTS[0]]
    assert outs["low1"].outputs[0].token_ids == solo[PROMPTS[1]]
    assert all(o.outputs[0].finish_reason == "length" for o in outs.values())
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks


def test_generate_takes_a_priority_per_prompt(llm):
    outs = llm.generate(PROMPTS[:3], greedy(2), priority=[3, -1, 0], use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS[:3]  # outputs stay in input order
    with pytest.raises(ValueError, match="2 priorities for 3 prompts"):
        llm.generate(PROMPTS[:3], greedy(2), priority=[1, 2], use_tqdm=False)
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.generate(PROMPTS[:1], greedy(2), priority=[0.5], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_timeout_aborts_with_the_tokens_so_far(llm):
    eng = llm.engine
    now = [0.0]
    real_clock = eng.core.clock
    eng.core.clock = lambda: now[0]
    try:
        eng.add_request("t", PROMPTS[0], greedy(50), timeout=5.0)
        eng.add_request("free", PROMPTS[1], greedy(6))
        for _ in range(4):
            eng.step()
        now[0] = 5.0
        outs = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0]
        t = outs["t"]
        assert t.finish_reason == "abort" and 0 < len(t.token_ids) < 50 and t.text
        assert outs["free"].finish_reason == "length"
        assert eng.core.counters.requests_timed_out == 1
    finally:
        eng.core.clock = real_clock


def test_priority_refused_under_fcfs():
    # The engine is not loaded for this: the check runs before any request reaches it.
    from engine_core.config import EngineConfig
    from engine_core.engine_core import EngineCore
    from tests.integration.fake_executor import FakeExecutor

    core = EngineCore(EngineConfig(device="cpu", load_format="dummy"), FakeExecutor())
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        core.add_request("a", [1, 2], greedy(2), priority=1)
