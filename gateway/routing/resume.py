"""Resuming a generation that had produced tokens on a replica that failed, by replay on another:
the new replica gets the prompt followed by the tokens already streamed as its prompt, and the rest
of the budget (max_tokens, min_tokens) as its own. Only where that continuation is the one the
failed replica would have produced:

- greedy (temperature 0), one sample: no random stream to carry over (a seeded sampler's position
  in its stream is lost with the replica);
- no stop strings: the tokenizer's stop-string checker holds back text that may start a stop
  string, and that state is lost with the failed replica's detokenize stream;
- no presence / frequency penalties: they count *output* tokens, which become prompt tokens here
  (the repetition penalty counts prompt and output alike, so it is fine);
- every other sampling field at its default unless listed in RESUME_SAFE (a field added later, e.g.
  structured output whose grammar state follows the output, is not resumable until it is added).
"""
from __future__ import annotations

import dataclasses

from engine_core.sampling_params import SamplingParams

GREEDY_EPS = 1e-5
# Fields whose value does not change what a greedy continuation of prompt + output produces.
RESUME_SAFE = frozenset({"n", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                         "max_tokens", "min_tokens", "stop_token_ids", "ignore_eos", "logprobs", "logit_bias",
                         "skip_special_tokens", "include_stop_str_in_output"})


def resumable(params: SamplingParams) -> bool:
    if params.n != 1 or params.temperature > GREEDY_EPS or params.stop:
        return False
    default = SamplingParams()
    return all(f.name in RESUME_SAFE or getattr(params, f.name) == getattr(default, f.name)
               for f in dataclasses.fields(SamplingParams))


def continuation(params: SamplingParams, produced: int) -> SamplingParams:
    """The sampling params of the rest of a generation that produced `produced` tokens."""
    rest = None if params.max_tokens is None else params.max_tokens - produced
    return dataclasses.replace(params, max_tokens=rest, min_tokens=max(0, params.min_tokens - produced))
