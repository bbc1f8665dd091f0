"""A deterministic, model-free Executor for service wiring tests (no torch, instant).

Keeps per-request state from the step deltas like the real ModelRunner (and raises ExecutorError
when out of sync); the "model" predicts next token = (last token * 31 + position) % vocab_size.
A prompt starting with BOOM_TOKEN makes execute() raise RuntimeError (an executor failure).
Usable by `python -m services.executor --executor tests.integration.fake_executor:FakeExecutor`.
"""
from __future__ import annotations

import time

from engine_core.executor.base import Executor, ExecutorError, ExecutorInfo
from engine_core.scheduler_output import (
    ModelRunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)

VOCAB = 1000
BOOM_TOKEN = 999


class FakeExecutor(Executor):
    def __init__(self, config=None, *, num_blocks: int = 64, block_size: int = 16, max_model_len: int = 512,
                 step_delay_s: float = 0.0) -> None:
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        if config is not None:
            self.num_blocks = config.num_gpu_blocks_override or num_blocks
            self.block_size = config.block_size
            self.max_model_len = config.max_model_len or max_model_len
        self.step_delay_s = step_delay_s
        self.requests: dict[str, dict] = {}
        self.executed: list[int] = []
        self.shut_down = False

    def describe(self) -> ExecutorInfo:
        return ExecutorInfo(model_name="fake", architecture="FakeForCausalLM", vocab_size=VOCAB,
                            max_model_len=self.max_model_len, num_kv_blocks=self.num_blocks,
                            block_size=self.block_size, dtype="float32", device="cpu", num_layers=1,
                            num_kv_heads=1, head_dim=4, kv_cache_bytes=self.num_blocks * 1024, eos_token_ids=[0])

    @staticmethod
    def next_token(last: int, position: int) -> int:
        return (last * 31 + position) % VOCAB

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for r in so.scheduled_new_reqs:
            if r.prompt_token_ids[0] == BOOM_TOKEN:
                raise RuntimeError("simulated device failure")
            self.requests[r.req_id] = {"tokens": r.prompt_token_ids + r.output_token_ids,
                                       "computed": r.num_computed_tokens, "blocks": list(r.block_ids),
                                       "sp": r.sampling_params}
        for r in so.scheduled_cached_reqs:
            st = self.requests.get(r.req_id)
            if st is None:
                raise ExecutorError(f"executor has no state for request {r.req_id!r} (out of sync)")
            if st["computed"] != r.num_computed_tokens:
                raise ExecutorError(f"request {r.req_id!r}: executor has {st['computed']} computed tokens, "
                                    f"scheduler says {r.num_computed_tokens}")
            st["blocks"].extend(r.new_block_ids)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        out = ModelRunnerOutput(step_id=so.step_id, execute_time_s=self.step_delay_s)
        for rid, n in so.num_scheduled_tokens.items():
            st = self.requests[rid]
            st["computed"] += n
            toks: list[int] = []
            if st["computed"] >= len(st["tokens"]):
                tok = self.next_token(st["tokens"][-1], len(st["tokens"]))
                st["tokens"].append(tok)
                toks.append(tok)
                toks.extend(so.scheduled_spec_decode_tokens.get(rid, []))  # accept every draft
            lp = None
            if st["sp"].logprobs is not None:
                k = st["sp"].logprobs
                lp = [TokenLogprobs(token_id=t, logprob=-0.5, rank=1, top_token_ids=list(range(k)),
                                    top_logprobs=[-1.0] * k) for t in toks]
            out.req_ids.append(rid)
            out.sampled_token_ids.append(toks)
            out.logprobs.append(lp)
        self.executed.append(so.step_id)
        return out

    def reset(self) -> None:
        self.requests.clear()

    def shutdown(self) -> None:
        self.shut_down = True


def slow_fake_executor(config=None) -> FakeExecutor:
    """A FakeExecutor whose steps take FAKE_EXECUTOR_STEP_DELAY_S seconds (default 0.02), so
    streams stay in flight long enough to cancel / fill queues (`--executor ...:slow_fake_executor`)."""
    import os

    return FakeExecutor(config, step_delay_s=float(os.environ.get("FAKE_EXECUTOR_STEP_DELAY_S", "0.02")))
