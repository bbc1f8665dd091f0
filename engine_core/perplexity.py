"""Perplexity of a model on a token sequence: the quality check for quantized weights
(`--quantization`), run in CI on CPU against the unquantized model on a committed text."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine_core.layers.attention_metadata import AttentionMetadata


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: list[int], device: torch.device | str = "cpu") -> float:
    """exp(mean negative log-likelihood of token i+1 given tokens 0..i), one causal forward over
    the whole sequence without a KV cache (the attention layers' no-cache path)."""
    n = len(token_ids)
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = torch.device(device)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        block_size=16, max_query_len=n, max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n], num_decodes=0,
    )
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
    hidden = model(ids, torch.arange(n, device=device), None, md)
    logits = model.compute_logits(hidden[:-1]).float()
    nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="mean")
    return math.exp(nll.item())
