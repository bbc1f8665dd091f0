"""The one Executor interface. Two implementations: in-process (local.py) and gRPC
(services/executor_client.py). The scheduler cannot tell them apart."""
from __future__ import annotations

from abc import ABC, abstractmethod
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
        """Forget every request (after a restart, the scheduler replays them as new)."""

    def shutdown(self) -> None:
        pass
