"""The one Executor interface. Two implementations: in-process (local.py) and gRPC
(services/executor_client.py). The scheduler cannot tell them apart.

Steps can be pipelined (async scheduling, DESIGN.md §2): `submit(step N+1)` may be called before
`get_result()` returned step N; results come back in submission order. An executor whose device
work is asynchronous (CUDA, a remote process) overlaps the two; the default implementation below
runs each step inside `submit`, which is correct for any executor, just not overlapped.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput


@dataclass
class ExecutorInfo:
    model_name: str
    architecture: str
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_cache_bytes: int
    eos_token_ids: list[int] = field(default_factory=list)
    # Speculative decoding as configured in the executor (0: off); the scheduler follows it.
    num_speculative_tokens: int = 0
    num_lookahead_slots: int = 0  # KV slots past the verified positions the proposer writes


class ExecutorError(RuntimeError):
    """The executor failed (crashed, unreachable, out of sync). In-flight requests can be replayed."""


class Executor(ABC):
    @abstractmethod
    def describe(self) -> ExecutorInfo:
        """Model and KV-cache geometry; the scheduler sizes its block manager from this."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's deltas, run the model on the scheduled tokens, sample."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every request (after a restart, the scheduler replays them as new). Steps still
        in flight are abandoned."""

    def shutdown(self) -> None:
        pass

    # ------------------------------------------------------------------ pipelined steps
    @property
    def max_concurrent_batches(self) -> int:
        """How many submitted steps are worth having in flight (vLLM's name). 1: `submit` runs
        the step itself, nothing overlaps. An in-process CUDA executor says 2 (prepare step N+1
        while N runs); a remote one more, to also cover the round trip between processes."""
        return 1

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        """Start a step without waiting for it. Default: run it now, keep the result (or error)."""
        q = self._sync_results()
        try:
            q.append(self.execute(scheduler_output))
        except ExecutorError as e:
            q.append(e)

    def get_result(self) -> ModelRunnerOutput:
        """The result of the oldest submitted step (raises its ExecutorError)."""
        q = self._sync_results()
        if not q:
            raise RuntimeError("get_result() without a submitted step")
        item = q.popleft()
        if isinstance(item, ExecutorError):
            q.clear()  # a failed step abandons the ones behind it, as a remote executor does
            raise item
        return item

    @property
    def supports_deferred_bitmasks(self) -> bool:
        """Can take a step with bitmasks_deferred (structured output under async scheduling): run
        its forward pass at submit, sample once provide_bitmasks brings the grammar bitmasks."""
        return False

    def provide_bitmasks(self, step_id: int, bitmasks: dict) -> None:
        """The grammar bitmasks of a submitted step that had bitmasks_deferred."""
        raise NotImplementedError(f"{type(self).__name__} does not take deferred bitmasks")

    def abandon_in_flight(self) -> None:
        """Drop every submitted step whose result was not taken (before a reset/replay)."""
        self._sync_results().clear()

    def _sync_results(self) -> deque:
        q = getattr(self, "_sync_result_queue", None)
        if q is None:  # lazily: subclasses need not call our __init__
            q = self._sync_result_queue = deque()
        return q
