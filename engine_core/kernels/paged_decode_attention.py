"""Paged decode attention (one query token per sequence) with split-KV (flash-decoding) and GQA.

Torch twin: the decode branch of engine_core.layers.attention.paged_attention_ref.

Why split-KV: a decode step has only B x Hkv independent (sequence, KV head) pairs; at small batch
that is far fewer programs than the GPU has SMs (H100: 132), and each program would stream the
whole context alone. Splitting every context into up to MAX_SPLITS parts multiplies the number of
programs; each writes a partial result (its normalised output and log-sum-exp), and a small
second kernel merges the partials exactly:  out = sum_s w_s * o_s / sum_s w_s,  w_s = 2^(lse_s - max lse).
When no sequence can have more than one split (max_seq_len <= MIN_SPLIT) the first kernel writes
the final output and the reduce is skipped.

Why GQA grouping: the G = Hq / Hkv query heads that share a KV head are processed by one program
as the rows of a [BLOCK_H, D] tile, so each K/V row is read from memory once per group instead of
once per query head; the scores are then a real matrix product (tensor cores), with the rows
padded to BLOCK_H >= 16 (the minimum tl.dot M) - free, since decode is memory-bound.

How a context is split (a function of that sequence's length alone, never of the batch):
    split_len(S) = max(MIN_SPLIT, round_up(ceil(S / MAX_SPLITS), BLOCK_N)),  n_splits(S) = ceil(S / split_len)
so at most MAX_SPLITS (16) splits of at least MIN_SPLIT (128) tokens. Results are therefore
batch-invariant and bit-identical between an eager step and a CUDA-graph replay of it.
The grid is (num_seqs, Hkv, Z) with Z = min(MAX_SPLITS, ceil(max_seq_len / MIN_SPLIT)) >= every
n_splits(S), S <= max_seq_len: Python ints only. Programs past a sequence's n_splits exit at once
and the reduce ignores them, so one launch captured with max_seq_len = max_model_len is correct
for every replayed length. A sequence with seq_len == 0 gets an all-zero output row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine_core.kernels import pdl_launch_args

_LOG2E = 1.4426950408889634


@triton.jit
def _split_len(seq_len, MAX_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split for this sequence: whole BLOCK_N tiles (so every tile a split visits holds
    at least one valid key, which keeps the online softmax free of -inf - -inf)."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, MAX_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])  # per-step ints: no variant per value class
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr,                 # [B, Hq, D] final output (used when DIRECT)
    mid_o_ptr, mid_lse_ptr,  # [B, Hq, num_splits, D] / [B, Hq, num_splits] fp32 partials
    qk_scale,                # softmax scale * log2(e): softmax is done in base 2 (exp2 = one MUFU op)
    num_splits,              # grid z: partial-buffer stride
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,  # K cache: per block, per token in block, per head (dim: 1)
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr,
    DIRECT: tl.constexpr,  # grid z == 1: every sequence has one split; write the output directly
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # before any load: the previous kernel has completed (kernels.pdl_enabled)
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    split_len = _split_len(seq_len, MAX_SPLITS, MIN_SPLIT, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if not DIRECT:  # noqa: SIM102 - constexpr test kept apart from the run-time one
        if start >= end:  # no tokens here: the reduce kernel knows to skip this split
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
    o = acc / tl.maximum(l_i, 1e-30)[:, None]  # seq_len == 0 (padding): acc == 0 -> zeros
    if DIRECT:  # (same bits as the reduce of a single split: its weight is exactly 1)
        tl.store(out_ptr + b64 * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = (b64 * (G * tl.num_programs(1)) + heads) * num_splits + split  # [B, Hq, num_splits]
        tl.store(mid_o_ptr + row[:, None] * D + d[None, :], o, mask=o_mask)
        tl.store(mid_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, seq_lens_ptr, out_ptr, num_splits,
    stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # before any load: the previous kernel has completed (kernels.pdl_enabled)
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    n_valid = tl.cdiv(seq_len, _split_len(seq_len, MAX_SPLITS, MIN_SPLIT, BLOCK_N))  # 0 when seq_len == 0
    s = tl.arange(0, MAX_SPLITS)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < n_valid  # empty splits wrote nothing: never read them
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits + s
    lse = tl.load(mid_lse_ptr + row, mask=s_mask, other=float("-inf"))
    lse_max = tl.where(n_valid > 0, tl.max(lse, 0), 0.0)
    w = tl.exp2(lse - lse_max)  # 0 for the masked splits
    o = tl.load(mid_o_ptr + row[:, None] * D + d[None, :], mask=s_mask[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)


MAX_SPLITS = 16   # splits per sequence at most
# Tokens per split at least (each split costs a partial write + its share of the reduce). 128, not
# 256: at batch 1 a 256-token context was one program walking it serially (H200, 8B heads: 9.9 us,
# 7.3 with 128); at batch 64 the extra partials cost 2-8 % (benchmarks/decode_split_sweep.py,
# benchmarks/results/decode_split_sweep_h200_2026-12-01.json). Smaller (64) helped batch 1 a
# little more but cost batch 64 up to 20 %. A function of the context alone keeps batch invariance.
MIN_SPLIT = 128
BLOCK_N = 64      # keys per tile


def num_split_programs(max_seq_len: int, max_splits: int = MAX_SPLITS, min_split: int = MIN_SPLIT) -> int:
    """Grid z: covers n_splits(S) for every S <= max_seq_len (since split_len(S) >= min_split)."""
    return max(1, min(max_splits, -(-max_seq_len // min_split)))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, out: torch.Tensor | None = None, *,
                           max_splits: int = MAX_SPLITS, min_split: int = MIN_SPLIT,
                           block_n: int = BLOCK_N, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """query [B, Hq, D] (one token per sequence; unit stride along D); key/value_cache
    [num_blocks, block_size, Hkv, D]; block_tables [>=B, max_blocks] int32; seq_lens [>=B] int32
    (context length including the current token, whose K/V is already in the cache).
    max_seq_len: Python int >= every seq_len (CUDA graphs: max_model_len).
    Returns out [B, Hq, D] (written into `out` when given, e.g. a slice of a larger output).

    max_splits / min_split / block_n define how a context is split; they change the rounding of
    the result, so eager and graph-captured steps must use the same values (the defaults)."""
    B, hq, d = query.shape
    _, block_size, hkv, dk = key_cache.shape
    assert dk == d and hq % hkv == 0 and query.stride(-1) == 1
    assert key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert block_size & (block_size - 1) == 0, "block_size must be a power of 2"
    assert max_splits & (max_splits - 1) == 0 and min_split % block_n == 0
    if out is None:
        out = torch.empty_like(query)
    if B == 0:
        return out
    z = num_split_programs(max_seq_len, max_splits, min_split)
    G = hq // hkv
    dot_prec = "ieee" if query.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    if z > 1:
        mid_o = torch.empty(B, hq, z, d, dtype=torch.float32, device=query.device)
        mid_lse = torch.empty(B, hq, z, dtype=torch.float32, device=query.device)
    else:
        mid_o = mid_lse = out  # unused
    _decode_split_kernel[(B, hkv, z)](
        query, key_cache, value_cache, block_tables, seq_lens, out, mid_o, mid_lse,
        scale * _LOG2E, z,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        G=G, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=max(16, triton.next_power_of_2(G)),
        BLOCK_N=block_n, BLOCK_SIZE=block_size, MAX_SPLITS=max_splits, MIN_SPLIT=min_split,
        DIRECT=z == 1, DOT_PREC=dot_prec, num_warps=num_warps, num_stages=num_stages,
        **pdl_launch_args(query.device),
    )
    if z > 1:
        _decode_reduce_kernel[(B, hq)](
            mid_o, mid_lse, seq_lens, out, z, out.stride(0), out.stride(1),
            D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
            MAX_SPLITS=max_splits, MIN_SPLIT=min_split, num_warps=4,
            **pdl_launch_args(query.device),
        )
    return out
