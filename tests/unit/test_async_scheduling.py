"""Async scheduling (step N+1 scheduled and submitted while step N runs; its input ids come from
step N's samples on the device) changes nothing a user can see: greedy tokens, seeded samples
(with penalties and min_tokens, which count the tokens still on the device), stop handling and
block accounting are identical with it on and off, under chunked prefill, preemption and prefix
caching. Real SmolLM2 on CPU."""
from __future__ import annotations

import argparse

import pytest

from engine_core.config import EngineConfig
from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

SHARED = "You are a helpful assistant. Answer in one short sentence, please. " * 3
PROMPTS = [
    SHARED + "What is the capital of France?",
    "def fibonacci(n):",
    SHARED + "Name a planet.",
    "1, 2, 3, 4,",
    "Once upon a time, in a land far away, there lived a dragon who",
    SHARED + "Name a color.",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 15 usable blocks of 16 tokens for six requests of up to ~75 tokens: preemption is certain;
    # a 32-token budget chunks every long prompt; the shared prefix gives prefix-cache hits.
    return LLM(max_model_len=128, num_gpu_blocks_override=16, max_num_batched_tokens=32, seed=0)


def _run(llm: LLM, params, async_on: bool):
    core = llm.engine.core
    core.max_in_flight = 2 if async_on else 1
    before = core.scheduler.num_preemptions
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    bm = core.scheduler.block_manager
    assert not core._in_flight
    assert bm.num_free_blocks == bm.num_usable_blocks  # nothing leaked
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], core.scheduler.num_preemptions - before


def test_greedy_identical_with_preemption_chunking_and_prefix_hits(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    hits_before = llm.engine.core.scheduler.block_manager.prefix_cache_hits
    sync, pre_sync = _run(llm, params, async_on=False)
    got, pre_async = _run(llm, params, async_on=True)
    assert got == sync
    assert pre_async > 0 and pre_sync > 0
    assert llm.engine.core.scheduler.block_manager.prefix_cache_hits > hits_before
    assert all(len(toks) == 24 for toks, _ in got)


def test_seeded_sampling_with_penalties_identical(llm):
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=16,
                             presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                             min_tokens=8)
              for i in range(len(PROMPTS))]
    sync, _ = _run(llm, params, async_on=False)
    got, _ = _run(llm, params, async_on=True)
    assert got == sync
    assert all(len(toks) >= 8 for toks, _ in got)


def test_stops_apply_exactly_despite_one_step_lag(llm):
    """The surplus token sampled after a stop is discarded: max_tokens and stop ids are exact."""
    greedy, _ = _run(llm, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), async_on=False)
    stops = [toks[5] for toks, _ in greedy]  # each request's 6th greedy token becomes a stop id
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[s]) for s in stops]
    got, _ = _run(llm, params, async_on=True)
    for (toks, reason), (full, _), stop in zip(got, greedy, stops):
        cut = full.index(stop) + 1
        assert toks == full[:cut]
        assert reason == "stop"
    lengths, _ = _run(llm, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), async_on=True)
    assert [t for t, _ in lengths] == [full[:3] for full, _ in greedy]


def test_async_scheduling_flag():
    p = EngineConfig.add_cli_args(argparse.ArgumentParser())
    assert p.parse_args([]).async_scheduling is True
    assert p.parse_args(["--no-async-scheduling"]).async_scheduling is False
