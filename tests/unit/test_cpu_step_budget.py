"""On CPU a long prompt is cut into step-budget chunks and capped while others wait, so a short
request sent behind a 2,000-token prompt gets its first token within 2 steps (counted in steps)."""
from __future__ import annotations

import torch

from engine_core.config import EngineConfig
from engine_core.llm_engine import LLMEngine
from engine_core.sampling_params import SamplingParams


def test_short_request_behind_long_prompt_gets_first_token_within_two_steps():
    config = EngineConfig(max_model_len=2304, kv_cache_memory_gb=0.25, cpu_threads=torch.get_num_threads())
    engine = LLMEngine(config)
    budget = config.max_num_batched_tokens
    assert budget <= 256  # the CPU default, not the GPU's 2048
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(100, 40000, (2000,), generator=g).tolist()
    short_prompt = torch.randint(100, 40000, (8,), generator=g).tolist()
    engine.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=4))
    engine.step()  # the long prompt's first chunk
    scheduler = engine.core.scheduler
    assert scheduler.stats().step_num_batched_tokens <= budget

    engine.add_request("short", short_prompt, SamplingParams(temperature=0, max_tokens=2))
    first_token_step = None
    for step in range(1, 4):
        outs = {o.request_id: o for o in engine.step()}
        assert scheduler.stats().step_num_batched_tokens <= budget
        if "short" in outs and outs["short"].outputs[0].token_ids:
            first_token_step = step
            break
    assert first_token_step is not None and first_token_step <= 2, first_token_step
    long_req = scheduler.requests["long"]
    assert long_req.num_computed_tokens < len(long_prompt)  # still prefilling: it did not block "short"
    engine.abort_request("long")
    while engine.has_unfinished_requests():
        engine.step()
