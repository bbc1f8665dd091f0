"""Whole-step attention on the Triton path: the same contract as paged_attention_ref /
causal_attention_ref in engine_core/layers/attention.py, split the way the batch is ordered.

    rows 0 .. num_decodes-1      decode kernel (split-KV, GQA-grouped), one row per sequence
    requests num_decodes .. B-1  prefill kernel (varlen causal over the paged cache)
    rows past the scheduled ones zeroed, as the reference does

Only Python ints of the metadata shape the launches (num_decodes, num_reqs, max_query_len,
max_seq_len); nothing reads a device tensor on the host, so a decode-only step is capturable in a
CUDA graph (see paged_decode_attention.py for what the graph needs).
"""
from __future__ import annotations

import torch

from engine_core.kernels.paged_decode_attention import paged_decode_attention
from engine_core.kernels.paged_prefill_attention import (
    paged_prefill_attention,
    varlen_causal_attention,
)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, md, scale: float,
                    **decode_kw) -> torch.Tensor:
    """query [T, Hq, D]; kv_cache [2, num_blocks, block_size, Hkv, D] already holding this step's
    K/V; md: AttentionMetadata. Returns [T, Hq, D]. decode_kw: split tuning for the decode
    kernel (tests only: eager and graph steps must split alike)."""
    out = torch.empty_like(query)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    nd, B = md.num_decodes, md.num_reqs
    if nd > 0:
        paged_decode_attention(query[:nd], key_cache, value_cache, md.block_tables, md.seq_lens, scale,
                               md.max_seq_len, out=out[:nd], **decode_kw)
    if B > nd:
        paged_prefill_attention(query, key_cache, value_cache, md.block_tables, md.seq_lens,
                                md.query_start_loc, nd, B - nd, md.max_query_len, scale, out)
    _zero_tail(out, md)
    return out


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, md,
                     scale: float) -> torch.Tensor:
    """No KV cache (profiling run): query [T, Hq, D], key/value [T, Hkv, D]."""
    out = torch.empty_like(query)
    varlen_causal_attention(query, key, value, md.query_start_loc, md.num_reqs, md.max_query_len,
                            scale, out)
    _zero_tail(out, md)
    return out


def _zero_tail(out: torch.Tensor, md) -> None:
    T = out.shape[0]
    if md.num_decodes == md.num_reqs and T == md.num_reqs:
        return  # pure decode step (the CUDA-graph case): every row is a scheduled token
    used = sum(md.query_lens_cpu)
    if used < T:
        out[used:].zero_()
