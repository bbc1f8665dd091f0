"""Per-step batch geometry that every attention layer reads (built once per step by the model runner).

Tokens of all scheduled requests are flattened into one dimension T (requests in batch order, each
request's tokens contiguous). Request i owns query rows query_start_loc[i]:query_start_loc[i+1] and,
after this step, has seq_lens[i] tokens of context in the paged KV cache (cached prefix + this
step's tokens). Its KV lives in the blocks block_tables[i, :ceil(seq_lens[i]/block_size)].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset where each new token's K/V goes
    query_start_loc: torch.Tensor  # [B+1] int32 cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32 context length after this step
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    block_size: int
    max_query_len: int
    max_seq_len: int
    # Host copies so the torch reference path needs no device->host sync.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decodes: int = 0  # requests with query_len == 1 come first in the batch (decode-first order)
    # Tensors derived from the above once per step and shared by every layer (e.g. gather indices).
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)
