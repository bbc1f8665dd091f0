"""Peak activation memory of one forward pass at the largest batch the scheduler may send."""
from __future__ import annotations

import torch
from torch import nn

from engine_core.config import EngineConfig
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.model_config import ModelConfig


@torch.inference_mode()
def profile_peak_memory(model: nn.Module, mc: ModelConfig, config: EngineConfig, device: torch.device) -> int:
    """Bytes in use at the peak of a prefill of max_num_batched_tokens tokens (split into
    sequences of at most max_model_len), weights included, with empty KV caches."""
    n = config.max_num_batched_tokens
    seq = min(n, config.max_model_len)
    lens = [seq] * (n // seq) + ([n % seq] if n % seq else [])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    qsl = [0]
    for q in lens:
        qsl.append(qsl[-1] + q)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(lens), 1, dtype=torch.int32, device=device),
        block_size=config.block_size, max_query_len=max(lens), max_seq_len=max(lens),
        query_lens_cpu=lens, seq_lens_cpu=lens, num_decodes=0,
    )
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    pos = torch.cat([torch.arange(q, device=device) for q in lens])
    empty = [torch.empty(0, device=device) for _ in range(mc.num_hidden_layers)]
    hidden = model(ids, pos, empty, md)
    # Sampling at max_num_seqs rows of logits in float32 is part of the peak too.
    rows = min(config.max_num_seqs, n)
    model.compute_logits(hidden[:rows])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden
    torch.cuda.empty_cache()
    return peak
