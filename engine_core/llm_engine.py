"""LLMEngine: EngineCore + tokenizer + incremental detokenization + stop strings + n>1 fan-out.

Text in, text out; `add_request / step / abort_request` as in vLLM. The offline `LLM` class and
the CLI sit on top of it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engine_core.beam_search import BeamSearchParams
from engine_core.config import EngineConfig
from engine_core.detokenizer import IncrementalDetokenizer
from engine_core.engine_core import EngineCore
from engine_core.executor.base import Executor
from engine_core.outputs import CompletionOutput, RequestOutput
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import RequestOutputDelta
from engine_core.tokenizer import Tokenizer, load_engine_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    output: RequestOutput
    child_ids: list[str]
    detoks: dict[str, IncrementalDetokenizer | None] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        if executor is None:
            from engine_core.executor import make_executor

            executor = make_executor(config)  # LocalExecutor, or MultiprocExecutor for TP > 1
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_engine_tokenizer(config, executor)
        self.core = EngineCore(config, executor, tokenizer=self.tokenizer)
        self._requests: dict[str, _Tracked] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids")
            if not prompt:
                raise ValueError("prompt is empty: at least one token is required")
            return prompt, self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids")
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, timeout: float | None = None) -> None:
        """priority: lower is served first (needs scheduling_policy="priority"). timeout: seconds
        after which the request is aborted (finish_reason "abort") with the tokens it has; None:
        config.request_timeout."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self.encode_prompt(prompt)
        grouped = params.n > 1 or (params.best_of or 1) > params.n or params.use_beam_search
        child_ids = [f"{request_id}-{i}" for i in range(params.n)] if grouped else [request_id]
        # n>1 / best_of / beam search: one prefill, forked block tables (engine_core/sequence_group.py)
        self.core.add_generation(request_id, child_ids, token_ids, params, priority=priority, timeout=timeout)
        self._track(request_id, text, token_ids, child_ids, params.logprobs is not None, params.skip_special_tokens,
                    params.stop, params.include_stop_str_in_output)

    def add_beam_search_request(self, request_id: str, prompt: str | list[int], params: BeamSearchParams) -> None:
        """Beam search on forked block tables; the beam_width outputs arrive, best first, when it ends."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self.encode_prompt(prompt)
        child_ids = [f"{request_id}-{i}" for i in range(params.beam_width)]
        self.core.add_beam_search(request_id, child_ids, token_ids, params)
        self._track(request_id, text, token_ids, child_ids, False, True, [], False)

    def _track(self, request_id: str, text: str | None, token_ids: list[int], child_ids: list[str],
               logprobs: bool, skip_special_tokens: bool, stop: list[str], include_stop_str_in_output: bool) -> None:
        tracked = _Tracked(
            output=RequestOutput(request_id, text, token_ids,
                                 [CompletionOutput(i, "", [], logprobs=[] if logprobs else None)
                                  for i in range(len(child_ids))]),
            child_ids=child_ids,
        )
        for i, cid in enumerate(child_ids):
            tracked.detoks[cid] = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=skip_special_tokens,
                stop=stop, include_stop_str_in_output=include_stop_str_in_output)
            self._child_to_parent[cid] = (request_id, i)
        self._requests[request_id] = tracked

    def abort_request(self, request_id: str) -> None:
        tracked = self._requests.get(request_id)
        if tracked is not None:
            self.core.abort_requests(tracked.child_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the RequestOutputs that changed (finished ones included once)."""
        changed: dict[str, RequestOutput] = {}
        for delta in self.core.step():
            parent = self._apply(delta)
            if parent is not None:
                changed[parent.request_id] = parent
        for rid, out in changed.items():
            if out.finished:
                tracked = self._requests.pop(rid)
                for cid in tracked.child_ids:
                    self._child_to_parent.pop(cid, None)
        return list(changed.values())

    def _apply(self, delta: RequestOutputDelta) -> RequestOutput | None:
        key = self._child_to_parent.get(delta.request_id)
        if key is None:
            return None
        rid, index = key
        tracked = self._requests[rid]
        out = tracked.output.outputs[index]
        if out.finished:
            return None
        tracked.output.num_cached_tokens = max(tracked.output.num_cached_tokens, delta.num_cached_tokens)
        out.token_ids.extend(delta.new_token_ids)
        if delta.cumulative_logprob is not None:
            out.cum_logprob, out.score = delta.cumulative_logprob, delta.score
        if out.logprobs is not None and delta.new_logprobs:
            out.logprobs.extend(delta.new_logprobs)
        detok = tracked.detoks.get(delta.request_id)
        finish_reason, stop_reason = delta.finish_reason, delta.stop_reason
        if detok is not None:
            stop_str = detok.update(delta.new_token_ids) if delta.new_token_ids else None
            if stop_str is not None:
                if finish_reason is None:  # stop string seen in the text: end it in the scheduler now
                    self.core.finish_requests([delta.request_id], stop_reason=stop_str)
                finish_reason, stop_reason = "stop", stop_str  # a stop string wins over "length"
            if finish_reason is not None:
                detok.finish()  # flush a held-back tail (e.g. a partial multi-byte character)
            out.text = detok.output_text
        out.finish_reason, out.stop_reason = finish_reason, stop_reason
        return tracked.output

    def stats(self):
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()
