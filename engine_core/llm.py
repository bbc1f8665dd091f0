"""Offline API: `LLM(model=...).generate(prompts, SamplingParams)` and `LLM.chat(messages)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from engine_core.cpu_resources import set_openmp_wait_policy

set_openmp_wait_policy()  # before torch is first imported (below), unless the caller already did

from engine_core.beam_search import BeamSearchParams
from engine_core.config import EngineConfig
from engine_core.llm_engine import LLMEngine
from engine_core.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from engine_core.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 timeout: float | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in input order.
        priority: one per prompt, lower first (needs scheduling_policy="priority"), as in vLLM.
        timeout: seconds per request (queue time included) before it is aborted with its tokens."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, p, priority=prio, timeout=timeout)
                ids.append(rid)
        except Exception:
            for rid in ids:  # leave the engine clean for the next call
                self.engine.abort_request(rid)
            self._drain()
            raise
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search (vLLM's offline API) on forked block tables; HF generate(num_beams=...,
        do_sample=False) rules. One BeamSearchOutput per prompt, beams best first."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = []
        try:
            for prompt in prompts:
                rid = str(next(self._ids))
                self.engine.add_beam_search_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            self._drain()
            raise
        results = []
        for out in self._run(ids, use_tqdm):
            seqs = [BeamSearchSequence(out.prompt_token_ids + o.token_ids, o.token_ids, o.text, o.cum_logprob,
                                       o.score, o.finish_reason)
                    for o in out.outputs if o.score is not None]
            results.append(BeamSearchOutput(seqs))
        return results

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id not in results:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()
