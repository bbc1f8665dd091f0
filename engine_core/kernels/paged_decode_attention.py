"""Paged decode attention (one query token per sequence) with split-KV (flash-decoding) and GQA.

Torch twin: the decode branch of engine_core.layers.attention.paged_attention_ref.

Why split-KV: a decode step has only B x Hkv independent (sequence, KV head) pairs; at small batch
that is far fewer programs than the GPU has SMs (H100: 132), and each program would stream the
whole context alone. Splitting every context into NUM_SPLITS equal parts multiplies the number of
programs; each writes a partial result (its normalised output and log-sum-exp), and a small
second kernel merges the partials exactly:  out = sum_s w_s * o_s / sum_s w_s,  w_s = 2^(lse_s - max lse).
With NUM_SPLITS == 1 the first kernel writes the final output and the reduce is skipped.

Why GQA grouping: the G = Hq / Hkv query heads that share a KV head are processed by one program
as the rows of a [BLOCK_H, D] tile, so each K/V row is read from memory once per group instead of
once per query head; the scores are then a real matrix product (tensor cores), with the rows
padded to BLOCK_H >= 16 (the minimum tl.dot M) - free, since decode is memory-bound.

CUDA graphs: the grid is (num_seqs, Hkv, NUM_SPLITS) and depends only on Python ints; each
program derives its split from the sequence length it loads from memory
(split_len = ceil(ceil(seq_len / NUM_SPLITS) / BLOCK_N) * BLOCK_N), so one captured launch is
correct for every seq_len: short sequences simply leave trailing splits empty (those programs
exit at once, and the reduce ignores them). NUM_SPLITS only tunes speed; a runner capturing
graphs must choose it per captured batch size (e.g. with max_seq_len = max_model_len) and keep it.
A sequence with seq_len == 0 (graph padding) gets an all-zero output row.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr,                 # [B, Hq, D] final output (used when NUM_SPLITS == 1)
    mid_o_ptr, mid_lse_ptr,  # [B, Hq, NUM_SPLITS, D] / [B, Hq, NUM_SPLITS] fp32 partials
    qk_scale,                # softmax scale * log2(e): softmax is done in base 2 (exp2 = one MUFU op)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,  # K cache: per block, per token in block, per head (dim: 1)
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    # This sequence's equal share per split, rounded up to whole BLOCK_N tiles so that every tile
    # a split visits holds at least one valid key (keeps the online softmax free of -inf - -inf).
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if NUM_SPLITS > 1:
        if start >= end:  # empty split: the reduce kernel knows to skip it
            return

    g = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < G
    d_mask = d < D
    heads = kvh * G + g
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b64 * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        # token n lives in logical block n // BLOCK_SIZE -> physical block from the block table;
        # the gather is per token, so BLOCK_N and the cache's block size are independent.
        phys = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = n % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + (phys * stride_kb + tok * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + (phys * stride_vb + tok * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new

    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]  # seq_len == 0 (padding): acc == 0 -> zeros
        tl.store(out_ptr + b64 * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = (b64 * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [B, Hq, NUM_SPLITS]
        tl.store(mid_o_ptr + row[:, None] * D + d[None, :], acc / l_i[:, None], mask=o_mask)
        tl.store(mid_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, seq_lens_ptr, out_ptr,
    stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N  # same split as stage 1
    n_valid = tl.where(seq_len > 0, tl.cdiv(seq_len, tl.maximum(split_len, 1)), 0)
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < n_valid  # empty splits wrote nothing: never read them
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS + s
    lse = tl.load(mid_lse_ptr + row, mask=s_mask, other=float("-inf"))
    lse_max = tl.where(n_valid > 0, tl.max(lse, 0), 0.0)
    w = tl.exp2(lse - lse_max)  # 0 for the masked splits
    o = tl.load(mid_o_ptr + row[:, None] * D + d[None, :], mask=s_mask[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                    block_n: int = 64, min_tokens_per_split: int = 256, max_splits: int = 16) -> int:
    """Enough (sequence, KV head, split) programs to give every SM ~4 of them, but no split shorter
    than min_tokens_per_split (each split costs a partial write + the reduce). Power of 2, so only
    a handful of kernel variants ever compile. Depends on Python ints only (CUDA-graph safe)."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    want = triton.cdiv(4 * sms, max(1, num_seqs * num_kv_heads))
    by_len = max(1, max_seq_len // max(min_tokens_per_split, block_n))
    n = max(1, min(want, by_len, max_splits))
    return 1 << (n.bit_length() - 1)  # round down to a power of 2


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *, max_seq_len: int | None = None,
                           num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """query [B, Hq, D] (one token per sequence; unit stride along D); key/value_cache
    [num_blocks, block_size, Hkv, D]; block_tables [>=B, max_blocks] int32; seq_lens [>=B] int32
    (context length including the current token, whose K/V is already in the cache).
    Returns out [B, Hq, D] (written into `out` when given, e.g. a slice of a larger output).

    num_splits: fixed number of KV splits (pass it when capturing CUDA graphs); by default picked
    from the batch shape and max_seq_len (a Python int upper bound; 0/None = no split cap)."""
    B, hq, d = query.shape
    _, block_size, hkv, dk = key_cache.shape
    assert dk == d and hq % hkv == 0 and query.stride(-1) == 1
    assert key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert block_size & (block_size - 1) == 0, "block_size must be a power of 2"
    if out is None:
        out = torch.empty_like(query)
    if B == 0:
        return out
    block_n = block_n or 64
    if num_splits is None:
        num_splits = pick_num_splits(B, hkv, max_seq_len or 1 << 20, query.device, block_n)
    G = hq // hkv
    dot_prec = "ieee" if query.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    if num_splits > 1:
        mid_o = torch.empty(B, hq, num_splits, d, dtype=torch.float32, device=query.device)
        mid_lse = torch.empty(B, hq, num_splits, dtype=torch.float32, device=query.device)
    else:
        mid_o = mid_lse = out  # unused
    _decode_split_kernel[(B, hkv, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, mid_o, mid_lse,
        scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        G=G, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=max(16, triton.next_power_of_2(G)),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, DOT_PREC=dot_prec,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(B, hq)](
            mid_o, mid_lse, seq_lens, out, out.stride(0), out.stride(1),
            D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out
