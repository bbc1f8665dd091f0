"""Speculative decoding through the services on the real SmolLM2 (CPU): the executor service
(GrpcExecutor <-> ExecutorServicer, drafts travel in StepResult.spec_token_ids) and the scheduler
service (Generate RPC) give the same greedy tokens as the in-process engine without speculation."""
from __future__ import annotations

import pytest

from engine_core.config import EngineConfig
from engine_core.engine_core import EngineCore
from engine_core.executor.local import LocalExecutor
from engine_core.sampling_params import SamplingParams
from services.executor_client import GrpcExecutor
from tests.integration.test_executor_service import start_server
from tests.integration.test_scheduler_service import Scheduler, collect, gen_req

pytestmark = pytest.mark.timeout(600)
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4}'
ENGINE = {"max_model_len": 256, "num_gpu_blocks_override": 64, "device": "cpu"}
PROMPTS = {f"r{i}": [1, 504, 3060 + 17 * i, 314, 253, 2019 + i, 30] * 3 for i in range(3)}
MAX_TOKENS = 16


def _generate(executor, spec: str | None) -> tuple[dict[str, list[int]], EngineCore]:
    core = EngineCore(EngineConfig(max_model_len=256, device="cpu", speculative_config=spec), executor)
    for rid, prompt in PROMPTS.items():
        core.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    tokens: dict[str, list[int]] = {r: [] for r in PROMPTS}
    for _ in range(500):
        if not core.has_unfinished_requests():
            break
        for d in core.step():
            tokens[d.request_id] += d.new_token_ids
    assert not core.has_unfinished_requests()
    return tokens, core


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    ex = LocalExecutor(EngineConfig(**ENGINE))
    try:
        return _generate(ex, None)[0]
    finally:
        ex.shutdown()


@pytest.mark.parametrize("spec_of", ["ngram", "draft_model"])
def test_executor_service_same_tokens(reference, gguf_path, spec_of):
    spec = NGRAM if spec_of == "ngram" else \
        f'{{"method": "draft_model", "model": "{gguf_path}", "num_speculative_tokens": 3}}'
    ex = LocalExecutor(EngineConfig(**ENGINE, speculative_config=spec))
    srv = start_server(ex)
    try:
        with GrpcExecutor(f"127.0.0.1:{srv.port}", wait_ready_s=10, step_timeout_s=120) as remote:
            info = remote.describe()
            assert info.num_speculative_tokens == (4 if spec_of == "ngram" else 3)
            assert info.num_lookahead_slots == (0 if spec_of == "ngram" else 3)
            tokens, core = _generate(remote, spec)
    finally:
        srv.stop(0).wait(5)
        ex.shutdown()
    assert tokens == reference
    assert core.max_in_flight == 1
    assert core.counters.spec_decode_num_accepted_tokens > 0


def test_scheduler_service_same_tokens(reference):
    s = Scheduler(lambda config: LocalExecutor(config), max_model_len=256, num_gpu_blocks_override=64,
                  max_num_batched_tokens=64, device="cpu", speculative_config=NGRAM)
    try:
        got = {}
        for rid, prompt in PROMPTS.items():
            call = s.stub.Generate(gen_req(rid, prompt, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                                   timeout=300)
            got[rid] = collect(call)[0]
        counters = s.svc.engine.core.counters
    finally:
        s.close()
    assert got == reference
    assert counters.spec_decode_num_accepted_tokens > 0


def test_executor_and_scheduler_flags_must_agree():
    ex = LocalExecutor(EngineConfig(**ENGINE))
    try:
        with pytest.raises(ValueError, match="same --speculative-config"):
            EngineCore(EngineConfig(max_model_len=256, device="cpu", speculative_config=NGRAM), ex)
    finally:
        ex.shutdown()
