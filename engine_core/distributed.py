"""Tensor-parallel (TP) group state and collectives, passed explicitly (no module globals).

A `TPGroup` names one rank of a tensor-parallel group: its rank, the group size, the
torch.distributed process group (gloo on CPU, NCCL on CUDA) and the rank's device. Layers that
shard their weights take one at construction; `TPGroup()` (world_size 1) is the single-device
engine, for which every collective below is a no-op that returns its input untouched, so the
TP=1 path runs exactly the code it ran before tensor parallelism existed.

Sharding rules for attention (vLLM's, also the only ones that keep each rank's attention local):
- Q heads are split evenly: N must divide num_attention_heads.
- KV heads are split evenly when num_key_value_heads >= N (N must divide it), and replicated
  when num_key_value_heads < N (it must divide N): then N / num_kv_heads consecutive ranks hold
  the same KV head, exactly the one their Q heads use (GQA groups are consecutive Q heads).
- MLP: N must divide intermediate_size. Vocab: padded up to a multiple of N (no constraint).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed.ProcessGroup; None at world_size 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad tensor-parallel rank {self.rank} of {self.world_size}")
        if self.world_size > 1 and self.group is None:
            raise ValueError("a TPGroup with world_size > 1 needs a process group")

    @property
    def is_driver(self) -> bool:
        """Rank 0 returns the step results; every rank computes (and samples) the same."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (graph-capturable with NCCL). Returns x."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim (rank order); same result on every rank."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (KV block counts: all ranks must agree)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


# ---------------------------------------------------------------------------- sharding rules
def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"tensor_parallel_size {denominator} must divide {what} ({numerator})")
    return numerator // denominator


@dataclass(frozen=True)
class AttentionShard:
    """One rank's share of the attention heads."""

    num_heads: int  # Q heads on this rank
    num_kv_heads: int  # KV heads on this rank (cached in its KV cache)
    q_head_start: int  # first global Q head
    kv_head_start: int  # first global KV head
    kv_replicas: int  # ranks holding each KV head: 1 = split, > 1 = replicated


def attention_shard(num_heads: int, num_kv_heads: int, tp_size: int, rank: int = 0) -> AttentionShard:
    heads = divide(num_heads, tp_size, "num_attention_heads")
    if num_kv_heads >= tp_size:
        kv_heads = divide(num_kv_heads, tp_size, "num_key_value_heads")
        replicas = 1
    else:
        if tp_size % num_kv_heads != 0:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must divide tensor_parallel_size "
                             f"{tp_size} when it is smaller (KV heads are then replicated)")
        kv_heads, replicas = 1, tp_size // num_kv_heads
    return AttentionShard(num_heads=heads, num_kv_heads=kv_heads, q_head_start=rank * heads,
                          kv_head_start=(rank // replicas) * kv_heads, kv_replicas=replicas)


def vocab_shard(vocab_size: int, tp_size: int, rank: int = 0) -> tuple[int, int, int]:
    """(rows per rank, first row of this rank, rows of real vocab on this rank). Rows per rank is
    ceil(vocab / N); the last rank's tail is zero padding (never sampled: logits are cut to vocab)."""
    per_rank = -(-vocab_size // tp_size)
    start = rank * per_rank
    return per_rank, start, max(0, min(per_rank, vocab_size - start))


def check_tensor_parallel(model_config, tp_size: int) -> None:
    """Raise a ValueError naming the field when the model cannot be split over tp_size ranks."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    attention_shard(model_config.num_attention_heads, model_config.num_key_value_heads, tp_size)
    divide(model_config.intermediate_size, tp_size, "intermediate_size")
