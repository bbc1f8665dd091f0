"""Perplexity of a model on a token sequence: the quality check for quantized weights
(`--quantization`) and for an fp8 KV cache (`--kv-cache-dtype fp8`), run in CI on CPU against the
unquantized model on a committed text."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine_core.layers.attention import Attention
from engine_core.layers.attention_metadata import AttentionMetadata


def _nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model.compute_logits(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def no_cache_metadata(n: int, device: torch.device | str = "cpu", block_size: int = 16) -> AttentionMetadata:
    """Metadata of one n-token prefill without a KV cache (causal attention over the sequence)."""
    device = torch.device(device)
    return AttentionMetadata(
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        block_size=block_size, max_query_len=n, max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n],
        num_decodes=0,
    )


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: list[int], device: torch.device | str = "cpu", *,
               chunk_size: int | None = None, kv_cache_dtype: torch.dtype | None = None,
               block_size: int = 16) -> float:
    """exp(mean negative log-likelihood of token i+1 given tokens 0..i).

    chunk_size None: one causal forward over the whole sequence without a KV cache (the attention
    layers' no-cache path). chunk_size C: the sequence goes through a paged KV cache of
    `kv_cache_dtype` (default: the model's) C tokens at a time, as chunked prefill runs it, so every
    chunk after the first attends to keys and values read back from the cache (the decode /
    chunked-prefill path, e.g. fp8-rounded K/V); chunk_size 1 is token-by-token decoding."""
    n = len(token_ids)
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = torch.device(device)
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
    if chunk_size is None:
        hidden = model(ids, torch.arange(n, device=device), None, no_cache_metadata(n, device, block_size))
        return math.exp((_nll(model, hidden[:-1], ids[1:]) / (n - 1)).item())

    attn = [m for m in model.modules() if isinstance(m, Attention)]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    nblk = -(-n // block_size)
    caches = [torch.zeros(2, nblk + 1, block_size, a.num_kv_heads, a.head_dim, dtype=kv_cache_dtype or dtype,
                          device=device) for a in attn]  # block 0: the reserved null block
    block_table = torch.arange(1, nblk + 1, dtype=torch.int32, device=device)[None, :]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n - 1, chunk_size):
        end = min(start + chunk_size, n - 1)  # the last token is only a target
        L = end - start
        md = AttentionMetadata(
            slot_mapping=torch.arange(block_size + start, block_size + end, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor([0, L], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=device),
            block_tables=block_table, block_size=block_size, max_query_len=L, max_seq_len=end,
            query_lens_cpu=[L], seq_lens_cpu=[end], num_decodes=1 if L == 1 else 0,
        )
        hidden = model(ids[start:end], torch.arange(start, end, device=device), caches, md)
        total += _nll(model, hidden, ids[start + 1:end + 1]).double().cpu()
    return math.exp((total / (n - 1)).item())
