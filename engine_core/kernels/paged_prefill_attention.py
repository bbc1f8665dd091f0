"""Varlen causal prefill / chunked-prefill attention over the paged KV cache (flash-attention style).

Torch twins: the prefill loop of engine_core.layers.attention.paged_attention_ref (PAGED) and
causal_attention_ref (no cache: the profiling run).

Request i's query chunk is rows query_start_loc[i]:query_start_loc[i+1] (L tokens); after this
step it has S = seq_lens[i] tokens in the cache (its prefix of S - L cached tokens, then the chunk,
whose K/V the KV write already stored). Query j of the chunk sits at absolute position S - L + j
and sees keys 0 .. S - L + j: the whole cached prefix plus the chunk, causally.

Tiling: one program per (request, KV head, tile of BLOCK_Q query tokens). Defaults BLOCK_M=128 rows,
BLOCK_N=32 keys, 8 warps: on an H100 (Llama-8B heads, 4 x 2048-token prompts, bf16) 274 TFLOP/s
against 231 for 64 x 64 / 4 warps, and 471 for torch SDPA's flash kernel on a dense layout. Its BLOCK_M = BLOCK_Q * G
rows are those query tokens for all G query heads of the KV head (row r = token r // G, head
r % G), so every K/V tile is loaded once for the whole GQA group and the score tile is a large
[BLOCK_M, BLOCK_N] matrix product. Keys are streamed in BLOCK_N tiles with the online softmax
(running max m, running sum l, rescaled accumulator), in base 2. The key loop stops at the last
key the tile's final query can see, so causality skips the upper triangle's tiles outright.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


# Per-step ints are not specialized (Triton would compile a variant per "== 1" / "% 16 == 0" class
# of each, on the hot path of a live server, whenever a new combination first shows up).
@triton.jit(do_not_specialize=["first_req", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    first_req,  # index of the first request handled (= num_decodes: prefills follow the decodes)
    qk_scale,   # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    # PAGED: k/v are the caches [num_blocks, block_size, Hkv, D] -> strides of block, token, head.
    # not PAGED: k/v are this step's [T, Hkv, D] rows -> stride_kb/vb unused, token, head.
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    req = first_req + tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + req)
    L = tl.load(query_start_loc_ptr + req + 1) - q_start
    if tile * BLOCK_Q >= L:  # the grid is sized for the longest chunk; shorter ones exit here
        return
    if PAGED:
        S = tl.load(seq_lens_ptr + req)
    else:
        S = L
    ctx = S - L  # cached prefix length

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    qi = tile * BLOCK_Q + r // G  # query token within the chunk
    heads = kvh * G + r % G
    row_mask = (r // G < BLOCK_Q) & (qi < L)
    q_rows = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = ctx + qi  # absolute positions; rows past L see every key < kv_end (harmless, never stored)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # last key any row of this tile may see, + 1. Key 0 is visible to every row, so the first
    # tile gives each row a finite max and later fully-masked rows just add p = 0.
    kv_end = ctx + tl.minimum((tile + 1) * BLOCK_Q, L)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    for n0 in range(0, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < kv_end
        if PAGED:
            phys = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            k_off = phys * stride_kb + (n % BLOCK_SIZE) * stride_kt + kvh * stride_kh
            v_off = phys * stride_vb + (n % BLOCK_SIZE) * stride_vt + kvh * stride_vh
        else:
            rows = (q_start + n).to(tl.int64)
            k_off = rows * stride_kt + kvh * stride_kh
            v_off = rows * stride_vt + kvh * stride_vh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * qk_scale
        visible = (n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _launch(query, k, v, out, block_tables, seq_lens, query_start_loc, first_req, num_reqs,
            max_query_len, scale, paged, block_size, strides_k, strides_v, stride_bt,
            block_m, block_n):
    _, hq, d = query.shape
    hkv = strides_k[3]
    G = hq // hkv
    if query.dtype == torch.float32:  # fp32 dots run on FMA units ("ieee"): smaller tiles, no spills
        block_m, block_n = min(block_m, 32), min(block_n, 32)
    block_m = max(block_m, triton.next_power_of_2(G))
    block_q = block_m // G
    grid = (num_reqs, hkv, triton.cdiv(max_query_len, block_q))
    _prefill_kernel[grid](
        query, k, v, out, block_tables, seq_lens, query_start_loc, first_req, scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *strides_k[:3], *strides_v[:3], stride_bt,
        G=G, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, PAGED=paged, DOT_PREC="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4 if block_m <= 64 else 8, num_stages=2,
    )


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, first_req: int, num_reqs: int,
                            max_query_len: int, scale: float, out: torch.Tensor, *,
                            block_m: int = 128, block_n: int = 32) -> torch.Tensor:
    """Attention for requests first_req .. first_req + num_reqs - 1 of the batch.

    query/out: [T, Hq, D] for the whole step (rows addressed through query_start_loc, so decode
    rows before first_req are left alone); key/value_cache [num_blocks, block_size, Hkv, D]
    already holding this step's K/V; block_tables [B, max_blocks] int32; seq_lens [B] int32;
    query_start_loc [B+1] int32; max_query_len: Python int >= every handled chunk length."""
    if num_reqs <= 0 or max_query_len <= 0:
        return out
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    _, block_size, hkv, _ = key_cache.shape
    assert block_size & (block_size - 1) == 0, "block_size must be a power of 2"
    sk = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), hkv)
    sv = (value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), hkv)
    _launch(query, key_cache, value_cache, out, block_tables, seq_lens, query_start_loc, first_req,
            num_reqs, max_query_len, scale, True, block_size, sk, sv, block_tables.stride(0),
            block_m, block_n)
    return out


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            query_start_loc: torch.Tensor, num_reqs: int, max_query_len: int,
                            scale: float, out: torch.Tensor, *, block_m: int = 128,
                            block_n: int = 32) -> torch.Tensor:
    """No KV cache (profiling run): each request attends causally to its own rows of key/value
    [T, Hkv, D]. Same kernel with the paged gather switched off."""
    if num_reqs <= 0 or max_query_len <= 0:
        return out
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    hkv = key.shape[1]
    sk = (0, key.stride(0), key.stride(1), hkv)
    sv = (0, value.stride(0), value.stride(1), hkv)
    _launch(query, key, value, out, query_start_loc, query_start_loc, query_start_loc, 0,
            num_reqs, max_query_len, scale, False, 16, sk, sv, 0, block_m, block_n)
    return out
