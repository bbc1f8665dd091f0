"""User-facing results of the offline API (shaped like vLLM's RequestOutput)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine_core.scheduler_output import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    # Set by the engine for best_of and beam search (without per-token logprobs to sum).
    cum_logprob: float | None = None
    score: float | None = None  # beam search: cumulative logprob / len ** length_penalty

    @property
    def cumulative_logprob(self) -> float | None:
        if self.cum_logprob is not None:
            return self.cum_logprob
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's BeamSearchSequence): tokens = prompt + generated."""

    tokens: list[int]
    output_token_ids: list[int]
    text: str | None
    cum_logprob: float
    score: float
    finish_reason: str | None


@dataclass
class BeamSearchOutput:
    """LLM.beam_search's result for one prompt: the beams, best first."""

    sequences: list[BeamSearchSequence]
