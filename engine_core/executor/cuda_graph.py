"""CUDA graphs for decode steps: the whole model forward captured once per padded batch size.

A decode step launches hundreds of small kernels; at small batch the GPU idles between them while
Python launches the next. Replaying a captured graph removes that launch overhead. Graphs are
captured at batch sizes 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (as vLLM does); a step with B
decodes replays the smallest graph >= B with the extra rows padded (slot -1 -> the null block,
context length 1). Prefill and mixed steps, and batches above the largest size, run eagerly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine_core.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, limit + 1, 8))
    top = min(max_num_seqs, limit)
    return sorted({s for s in sizes if s <= top} | {top})


@dataclass
class _Buffers:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor


class CudaGraphRunner:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], *, max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.buf = _Buffers(
            input_ids=torch.zeros(self.max_bs, dtype=torch.long, device=device),
            positions=torch.zeros(self.max_bs, dtype=torch.long, device=device),
            slot_mapping=torch.full((self.max_bs,), -1, dtype=torch.long, device=device),
            seq_lens=torch.ones(self.max_bs, dtype=torch.int32, device=device),
            block_tables=torch.zeros(self.max_bs, max_blocks, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(self.max_bs + 1, dtype=torch.int32, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        b = self.buf
        # Host-side fields take their upper bounds so kernel grids cover any replayed batch.
        return AttentionMetadata(
            slot_mapping=b.slot_mapping[:bs], query_start_loc=b.query_start_loc[:bs + 1],
            seq_lens=b.seq_lens[:bs], block_tables=b.block_tables[:bs], block_size=self.block_size,
            max_query_len=1, max_seq_len=self.max_model_len, query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs, num_decodes=bs)

    @torch.inference_mode()
    def capture(self) -> None:
        b = self.buf
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            for _ in range(2):  # warm up (Triton autotune / lazy init) outside the capture
                self.model(b.input_ids[:bs], b.positions[:bs], self.kv_caches, self._metadata(bs))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # A fresh metadata object: per-step derived tensors must be computed inside the graph.
            md = self._metadata(bs)
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(b.input_ids[:bs], b.positions[:bs], self.kv_caches, md)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, md: AttentionMetadata) -> bool:
        return md.num_decodes == md.num_reqs and md.num_reqs <= self.max_bs and md.max_seq_len <= self.max_model_len

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        n = md.num_reqs
        bs = next(s for s in self.sizes if s >= n)
        b = self.buf
        b.input_ids[:n].copy_(input_ids, non_blocking=True)
        b.positions[:n].copy_(positions, non_blocking=True)
        b.slot_mapping[:n].copy_(md.slot_mapping, non_blocking=True)
        b.slot_mapping[n:bs].fill_(-1)
        b.seq_lens[:n].copy_(md.seq_lens, non_blocking=True)
        b.seq_lens[n:bs].fill_(1)
        width = md.block_tables.shape[1]
        b.block_tables[:n, :width].copy_(md.block_tables, non_blocking=True)
        b.block_tables[:n, width:].zero_()
        b.block_tables[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
