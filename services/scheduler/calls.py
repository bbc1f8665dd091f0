"""A Generate request as the scheduler service tracks it: the call (its sink, its samples) and the
route from an engine-level sample id back to it."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from engine_core.request import Request
from engine_core.sampling_params import SamplingParams
from services.gen.pagedserve.v1 import scheduler_pb2
from services.scheduler.sinks import CallSink, StreamSink


@dataclass(eq=False)
class GenerateCall:
    """One request (a Generate call, or one request of a GenerateStream). The engine thread tells
    its `sink` (event loop side) whether it was admitted, then delivers its outputs there."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: CallSink | StreamSink
    key: int = 0  # the GenerateStream key (stream requests only)
    submitted: float = field(default_factory=time.monotonic)
    done: bool = False
    # W3C trace context for the executor's spans (services/tracing.py); None: not traced.
    trace_context: dict[str, str] | None = None
    remaining: int = 0  # samples without a final message yet (event-loop side bookkeeping)
    span: object = None  # the request's tracing.server_span (stream requests)
    compiled_grammar: object = None  # structured output: compiled off the engine thread (xgrammar)
    priority: int = 0  # GenerateRequest.priority (lower first; priority policy only)
    timeout_s: float | None = None  # GenerateRequest.timeout_s (None: the server's --request-timeout)

    def __post_init__(self) -> None:
        self.remaining = self.params.n

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def child_ids(self) -> list[str]:
        return child_ids(self.request_id, self.params.n)


def scheduling_error(request: scheduler_pb2.GenerateRequest, policy: str) -> str | None:
    """Why the request's priority / timeout_s cannot be served (an INVALID_ARGUMENT message naming
    the field), or None. vLLM refuses a priority under FCFS rather than ignoring it silently."""
    if request.priority != 0 and policy != "priority":
        return (f"priority {request.priority} needs the priority scheduling policy (--scheduling-policy "
                f"priority); this scheduler is {policy} (priority must be 0)")
    if request.HasField("timeout_s") and not 0 <= request.timeout_s < math.inf:
        return f"timeout_s must be a finite number of seconds >= 0 (0: none), got {request.timeout_s}"
    return None


def scheduling_of(request: scheduler_pb2.GenerateRequest) -> dict:
    """GenerateCall's priority and timeout_s (None when unset: the server's --request-timeout)."""
    return {"priority": request.priority,
            "timeout_s": request.timeout_s if request.HasField("timeout_s") else None}


def child_ids(request_id: str, n: int) -> list[str]:
    """Engine-level ids of a request's samples: the id itself for n=1, "<id>#<i>" for n>1."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


@dataclass(eq=False)
class Route:
    """Engine-level sample id -> its call and sample index."""

    call: GenerateCall
    index: int
    request: Request
