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


def decode_rows(query_lens: list[int], seq_lens: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Short queries as decode rows: each query token's request index and context length. Row j of
    a request with L query rows and context S sees its first S - L + 1 + j tokens (causal)."""
    req_of_row = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    return req_of_row, [s - q + 1 + j for q, s in zip(query_lens, seq_lens) for j in range(q)]


def as_decode_rows(md: AttentionMetadata, max_rows: int, max_query_len: int) -> AttentionMetadata | None:
    """A step whose requests all have short queries (speculative verification: k+1 rows each) as a
    pure-decode step of one row per query token: row j of a request with L rows and context S
    attends to its first S - L + 1 + j tokens (causal), through the request's block table. Every
    row's K/V is written before attention reads, so this equals the chunked-prefill path, and it
    runs on the decode kernel and its CUDA graphs. None: a longer query, or more than max_rows rows."""
    ql, sl = md.query_lens_cpu, md.seq_lens_cpu
    T = sum(ql)
    if not ql or T > max_rows or max(ql) > max_query_len:
        return None
    if md.num_decodes == md.num_reqs:
        return md
    dev = md.seq_lens.device
    req_of_row, row_lens = decode_rows(ql, sl)
    req_of_row = req_of_row.to(dev)
    return AttentionMetadata(
        slot_mapping=md.slot_mapping[:T], query_start_loc=torch.arange(T + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(row_lens, dtype=torch.int32, device=dev),
        block_tables=md.block_tables.index_select(0, req_of_row), block_size=md.block_size, max_query_len=1,
        max_seq_len=md.max_seq_len, query_lens_cpu=[1] * T, seq_lens_cpu=row_lens, num_decodes=T)
