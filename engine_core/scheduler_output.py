"""The scheduler -> executor contract: one step's *deltas* (DESIGN.md §2), and the executor's reply.

The executor keeps per-request state (token ids, block table, sampling state), so a decode step
for a running request carries only its id, any newly appended block ids and a token count.
These dataclasses mirror protos/pagedserve/v1/executor.proto one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine_core.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the executor has no state for: first schedule, resumed after preemption, or
    replayed after an executor restart. It carries every token known so far so the executor can
    rebuild its state from tokens alone (nothing is lost when an executor dies)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the KV cache (prefix-cache hit)
    output_token_ids: list[int] = field(default_factory=list)  # non-empty when resumed/replayed
    # W3C trace context (traceparent/tracestate) of a traced request, so the executor's spans join
    # the request's trace (services/tracing.py); None when the request is not traced.
    trace_context: dict[str, str] | None = None


@dataclass
class CachedRequestData:
    """A request the executor already holds: only what changed since the last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int  # before this step; lets the executor check it is in sync
    # Copy-on-write edits of the block table: (index in the table, new block id). A shared block
    # this request writes into (after a fork) was replaced by its private copy.
    replaced_blocks: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    step_id: int
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # Tokens to compute this step per request: prompt chunk size, 1 for a decode, 1+k with
    # k speculative draft tokens.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Requests the executor must forget (finished, aborted or preempted) before running this step.
    finished_req_ids: set[str] = field(default_factory=set)
    # Copy-on-write block copies (src, dst) to apply before the forward pass (n>1 / beam search).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Structured output: the requests that sample under a grammar this step, and each one's
    # allowed-token bitmask for the sampled position ([words] int32, bit t of word t // 32 = token
    # t allowed). The bitmask needs the request's previous token: when that is still in flight
    # (async scheduling) the step goes out with bitmasks_deferred and the bitmasks follow through
    # Executor.provide_bitmasks once the previous step's result is applied; the executor runs the
    # forward pass meanwhile and samples when they arrive.
    grammar_req_ids: list[str] = field(default_factory=list)
    grammar_bitmasks: dict[str, np.ndarray] = field(default_factory=dict)
    bitmasks_deferred: bool = False

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Logprobs for one sampled token: its own logprob and the top-k alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the sampled token in the model's distribution
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    step_id: int
    req_ids: list[str] = field(default_factory=list)
    # Per request (same order as req_ids): tokens sampled this step. Empty while a prompt is still
    # being prefilled in chunks; several with speculative decoding.
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)
    execute_time_s: float = 0.0
    # Speculative decoding: per request (same order as req_ids), the draft tokens the executor
    # proposes for its next step (the scheduler schedules them, capped); empty: speculation off.
    spec_token_ids: list[list[int]] = field(default_factory=list)

    def by_request(self) -> dict[str, tuple[list[int], list[TokenLogprobs] | None]]:
        return {r: (t, lp) for r, t, lp in zip(self.req_ids, self.sampled_token_ids, self.logprobs)}
