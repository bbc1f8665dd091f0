"""Scheduler-side request state. The executor keeps its own mirror as rows of executor/input_batch.py."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine_core.sampling_params import SamplingParams
from engine_core.structured_output.request_grammar import RequestGrammar


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    # Scheduling policy "priority": lower is served first (vLLM's convention); ignored under fcfs.
    priority: int = 0
    # Monotonic time after which the request is aborted as timed out (None: no deadline).
    deadline: float | None = None
    # Set by the scheduler.
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is (or will be, once the in-flight step finishes) in the cache. Advanced at
    # schedule time, so a next step can be planned before the previous one returns (async scheduling).
    num_computed_tokens: int = 0
    # Tokens being sampled by steps still in flight (async scheduling): their slots are scheduled
    # (the executor feeds the sampled ids on the device), their ids are not known here yet.
    num_output_placeholders: int = 0
    # step_id of the step that (re)admitted the request: results of older steps (from before a
    # preemption, or of a finished request whose id was reused) are stale and ignored.
    admitted_step: int = -1
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 until scheduled
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Block hashes of the full blocks of all_token_ids, filled lazily by the block manager.
    block_hashes: list[bytes] = field(default_factory=list)
    # W3C trace context handed to the executor with the request (None: not traced).
    trace_context: dict[str, str] | None = None
    # Structured output: the grammar matcher, advanced with every kept output token (None: free).
    grammar: RequestGrammar | None = None
    # Speculative decoding: draft tokens the executor proposed for the next step (None: none).
    spec_token_ids: list[int] | None = None
    # Sequence groups (engine_core/sequence_group.py): the group of an n>1 prefill request or a
    # beam; fork_pending: forked, holding shared blocks, not admitted yet.
    group: object | None = None
    fork_pending: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
