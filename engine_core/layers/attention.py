"""Paged attention: write this step's K/V into the block cache, then attend over the cache.

KV cache layout per layer: one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V). A token with slot s lives at block s // block_size, offset s % block_size.

The functions here are the pure-torch reference (oracle for the Triton kernels, which `Attention`
uses instead for CUDA tensors: engine_core/kernels/paged_attention.py; and the CPU path, where the
C++ kernels of engine_core/kernels/cpu_decode_ops.cpp take the rotary + cache write and the decode
rows when they are built):
- `write_kv_cache_ref`  : scatter K/V rows into their slots (slot -1 = padding, skipped)
- `paged_attention_ref` : decodes batched in one SDPA (K/V gathered through the block table, length
                          mask); each prefill / chunked-prefill request in its own causal attention
                          (GEMMs, tiled by query rows) offset by the cached prefix
- `causal_attention_ref`: no cache at all (profiling run): plain causal attention per request over
                          this step's tokens only
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.kernels import triton_available
from engine_core.layers.attention_metadata import AttentionMetadata, decode_rows

FP8_KV_MAX = 448.0  # largest finite float8_e4m3fn


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Values as stored: fp8 (--kv-cache-dtype fp8) saturates at +-448 (a plain cast would give
    NaN) and travels as its raw bytes (CPU has no fp8 indexing kernels)."""
    if cache_dtype == torch.float8_e4m3fn:
        return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(cache_dtype).view(torch.uint8)
    return x.to(cache_dtype)


def raw_kv_view(cache: torch.Tensor) -> torch.Tensor:
    """The cache as stored bytes where torch lacks kernels for its dtype (fp8 on CPU), else itself."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def _widen(rows: torch.Tensor, cache_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from raw_kv_view(cache) -> the compute dtype."""
    return rows.view(cache_dtype).to(dtype) if cache_dtype == torch.float8_e4m3fn else rows.to(dtype)


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, padded: bool = True) -> None:
    """key/value: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; slot_mapping: [T].

    A negative slot marks a padding token (CUDA-graph padding): it is written to slot 0, which
    belongs to the reserved null block 0 that no request owns (block_manager.py), instead of
    being filtered out, which would need a device->host sync. padded=False: the caller knows every
    slot is >= 0 (CPU steps are never padded), so the per-layer clamp is skipped."""
    if kv_cache.numel() == 0:
        return
    _, num_blocks, block_size, hkv, d = kv_cache.shape
    flat = raw_kv_view(kv_cache).view(2, num_blocks * block_size, hkv, d)
    slots = slot_mapping.to(torch.long).clamp_min(0) if slot_mapping.dtype != torch.long or padded else slot_mapping
    flat[0].index_copy_(0, slots, _to_cache(key, kv_cache.dtype))
    flat[1].index_copy_(0, slots, _to_cache(value, kv_cache.dtype))


# Query rows per tile of the CPU causal attention: scores for g*64 rows x S keys stay cache-sized,
# and each tile reads only the keys its last row can see (the causal upper triangle is skipped).
CAUSAL_TILE_ROWS = 64


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      out: torch.Tensor) -> None:
    """q [L, Hq, D]; k/v [S, Hkv, D] with S >= L: query i sits at absolute position S-L+i and sees
    keys 0..S-L+i. Writes [L, Hq, D] into `out`.

    Plain GEMMs (bmm -> softmax -> bmm) with the query heads of one KV head stacked as rows: on CPU,
    SDPA with a mask or GQA falls back to its unfused math path, and even its flash kernel runs
    at ~45 GFLOP/s on these shapes; the GEMMs run on oneDNN/AMX at 3-10x that (a 64-token chunk over
    8k cached tokens: 31 -> 3.7 ms in bf16, 32 -> 8 ms in fp32). Scores are in the compute dtype,
    as HF's eager attention keeps them; softmax accumulates in fp32 inside."""
    L, hq, d = q.shape
    S, hkv, _ = k.shape
    g = hq // hkv
    # Head-major copies once per call (~0.1 ms at 8k): bmm would otherwise copy the strided
    # per-token layout again for every tile.
    vh = v.transpose(0, 1).contiguous()                 # [Hkv, S, D]
    kt = k.transpose(0, 1).contiguous().transpose(1, 2)  # [Hkv, D, S], read transposed by BLAS
    # Each tile's own t x t diagonal block is masked above its diagonal; a smaller last tile uses
    # the top-left corner of the same mask (built once per call, not per tile).
    above_diag = torch.ones(min(L, CAUSAL_TILE_ROWS), min(L, CAUSAL_TILE_ROWS), dtype=torch.bool,
                            device=q.device).triu_(1)
    for a in range(0, L, CAUSAL_TILE_ROWS):
        b = min(L, a + CAUSAL_TILE_ROWS)
        t, n = b - a, S - L + b  # rows in the tile, keys its last row sees
        qt = (q[a:b].reshape(t, hkv, g, d).permute(1, 2, 0, 3) * scale).reshape(hkv, g * t, d)
        s = torch.bmm(qt, kt[:, :, :n]).view(hkv, g, t, n)
        s[..., n - t:].masked_fill_(above_diag[:t, :t], float("-inf"))
        p = torch.softmax(s.view(hkv, g * t, n), dim=-1)
        o = torch.bmm(p, vh[:, :n])  # [Hkv, g*t, D]
        out[a:b] = o.view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hq, d)


def _gather_seq(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, block_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D] -> this request's first seq_len rows [seq_len, Hkv, D]
    in `dtype`."""
    nblk = _cdiv(seq_len, block_size)
    blocks = block_table_row[:nblk].to(torch.long)
    rows = raw_kv_view(cache).index_select(0, blocks).reshape(nblk * block_size, *cache.shape[2:])[:seq_len]
    return _widen(rows, cache.dtype, dtype)


# Requests with at most this many query rows (decodes, a speculative verification of k drafts, a
# short chunk) are attended to row by row in the step's one batched SDPA, each row with its own
# context length (= causal), instead of one masked SDPA per request: on CPU a per-request call
# costs ~0.6 ms per layer against ~0.1 ms for the batched rows (speculative decoding's verify steps).
SHORT_QUERY_ROWS = 16


def _num_row_batched(md: AttentionMetadata) -> int:
    """Decodes, then the requests right after them with short queries: attended together."""
    n = md.num_decodes
    while n < md.num_reqs and md.query_lens_cpu[n] <= SHORT_QUERY_ROWS:
        n += 1
    return n


def _decode_gather(md: AttentionMetadata, nb: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step (cached on md, shared by all layers), for the first nb (row-batched) requests: the
    cache slots each query row reads, [R, S], and an additive mask [R, 1, 1, S]. Rows as in
    decode_rows (causal). Positions past a row's length read slot 0 (the zeroed null block), so stale
    or uninitialised cache memory is never touched."""
    cached = md.derived.get("decode_gather")
    if cached is None:
        bs = md.block_size
        qlens, slens = md.query_lens_cpu[:nb], md.seq_lens_cpu[:nb]
        nblk = _cdiv(max(slens), bs)
        bt = md.block_tables[:nb, :nblk].to(device=device, dtype=torch.long)
        if nb == md.num_decodes:  # decodes only: one row per request
            row_lens = md.seq_lens[:nb].to(device)
        else:
            req_of_row, lens = decode_rows(qlens, slens)
            bt = bt[req_of_row.to(device)]
            row_lens = torch.tensor(lens, device=device)
        R = bt.shape[0]
        idx = (bt[:, :, None] * bs + torch.arange(bs, device=device)).view(R, nblk * bs)
        valid = torch.arange(nblk * bs, device=device)[None, :] < row_lens[:, None]
        idx = idx.masked_fill(~valid, 0)
        bias = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))[:, None, None, :]
        cached = md.derived["decode_gather"] = (idx, bias)
    return cached


def rows_attention_sdpa(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, nb: int,
               scale: float) -> torch.Tensor:
    """The row-batched requests' query rows ([R, Hq, D], R = their query tokens) in one SDPA over
    K/V gathered through the block tables, each row masked to its own length."""
    hq, d = query.shape[1:]
    hkv = kv_cache.shape[3]
    idx, bias = _decode_gather(md, nb, query.device)
    R, S = idx.shape
    flat_kv = raw_kv_view(kv_cache).view(2, -1, hkv, d)
    # K and V of every row in one gather: [2, R*S, Hkv, D]
    kv = _widen(flat_kv.index_select(1, idx.view(-1)), kv_cache.dtype, query.dtype)
    kv = kv.view(2, R, S, hkv, d).transpose(2, 3)
    q = query[:R].unsqueeze(2)  # [R, Hq, 1, D]
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias.to(query.dtype), scale=scale,
                                          enable_gqa=hq != hkv).squeeze(2)


def rows_attention_cpu_kernel(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, nb: int,
                     scale: float) -> torch.Tensor:
    """rows_attention_sdpa through the C++ kernel (kernels/cpu_decode_ops.cpp): K/V read in place through
    each row's block table, no gather copy and no mask."""
    from engine_core.kernels.cpu_ops import cpu_ops
    block_tables, lens = decode_row_tables(md, nb)
    rows = query if lens.shape[0] == query.shape[0] else query[:lens.shape[0]]
    return cpu_ops().paged_decode_attention(rows, kv_cache, block_tables, lens, scale)


def decode_row_tables(md: AttentionMetadata, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ decode attention's (block_tables [rows, M] int32, lens [rows] int32) for the step's
    first nb requests' rows, built once per step (md.derived)."""
    cached = md.derived.get("decode_rows_cpu")
    if cached is None:
        if nb == md.num_decodes:  # decodes only: one row per request
            cached = (md.block_tables[:nb], md.seq_lens[:nb])
        else:
            req_of_row, lens = decode_rows(md.query_lens_cpu[:nb], md.seq_lens_cpu[:nb])
            cached = (md.block_tables.index_select(0, req_of_row), torch.tensor(lens, dtype=torch.int32))
        md.derived["decode_rows_cpu"] = cached
    return cached


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                        row_attention=rows_attention_sdpa) -> torch.Tensor:
    """query: [T, Hq, D] (rows ordered as md describes); kv_cache already holds this step's K/V.
    Returns [T, Hq, D]. row_attention: how the row-batched requests are attended (the SDPA twin
    here; rows_attention_cpu_kernel on the CPU path where the C++ kernels are built)."""
    T = query.shape[0]
    bs = md.block_size
    nb = _num_row_batched(md)  # requests attended row by row in one call
    start = 0  # query rows done

    if nb:
        o = row_attention(query, kv_cache, md, nb, scale)
        R = o.shape[0]
        if R == T:  # every row done (e.g. a pure-decode step): nothing else to fill
            return o
        out = torch.empty_like(query)
        out[:R] = o
        start = R
    else:
        out = torch.empty_like(query)

    key_cache, value_cache = kv_cache[0], kv_cache[1]
    for i in range(nb, md.num_reqs):  # prefills / chunked prefills (a 1-token chunk works too)
        L, S = md.query_lens_cpu[i], md.seq_lens_cpu[i]
        k = _gather_seq(key_cache, md.block_tables[i], S, bs, query.dtype)
        v = _gather_seq(value_cache, md.block_tables[i], S, bs, query.dtype)
        _causal_attention(query[start:start + L], k, v, scale, out[start:start + L])
        start += L
    if start < T:  # rows beyond the scheduled tokens (padding) get zeros
        out[start:].zero_()
    return out


def causal_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         md: AttentionMetadata, scale: float) -> torch.Tensor:
    """No KV cache (profiling run): each request attends causally to its own tokens of this step."""
    out = torch.zeros_like(query)
    start = 0
    for L in md.query_lens_cpu:
        sl = slice(start, start + L)
        _causal_attention(query[sl], key[sl], value[sl], scale, out[sl])
        start += L
    return out


def _cpu_kernels_apply(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """The C++ CPU kernels take this step: CPU tensors, the kernels built, a cache in the compute
    dtype (an fp8 cache stays on the torch path) and q (with k, v) as [T, heads*D] rows."""
    if q.device.type != "cpu" or kv_cache.dtype != q.dtype or q.dim() != 2:
        return False
    from engine_core.kernels.cpu_ops import cpu_ops
    return cpu_ops() is not None


class Attention(nn.Module):
    """Stores this step's K/V in the paged cache and attends over it: Triton kernels on CUDA, the
    pure-torch reference otherwise."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata, rope: tuple[nn.Module, torch.Tensor] | None = None) -> torch.Tensor:
        """rope: (RotaryEmbedding, positions) to rotate q and k first; on the CUDA paged path and the
        CPU paged path with the C++ kernels, the rotation is fused with the KV-cache write (one
        kernel instead of two per layer, or one call instead of ~15 ops)."""
        cuda = q.is_cuda and triton_available()  # Triton kernels (engine_core/kernels), graph-capturable
        paged = kv_cache is not None and kv_cache.numel() > 0
        cpu_kernels = paged and not cuda and _cpu_kernels_apply(q, kv_cache)
        if rope is not None and not (paged and (cuda or cpu_kernels)):
            rotary_emb, positions = rope
            q, k = rotary_emb(positions, q, k)
            rope = None
        if cpu_kernels:
            if rope is not None:
                rotary_emb, positions = rope
                rotary_emb.rotate_and_cache(positions, q, k, v, kv_cache, md.slot_mapping)
            else:
                write_kv_cache_ref(k.reshape(-1, self.num_kv_heads, self.head_dim),
                                   v.reshape(-1, self.num_kv_heads, self.head_dim), kv_cache, md.slot_mapping,
                                   padded=False)
            q = q.reshape(-1, self.num_heads, self.head_dim)
            o = paged_attention_ref(q, kv_cache, md, self.scale, row_attention=rows_attention_cpu_kernel)
            return o.reshape(-1, self.num_heads * self.head_dim)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if cuda:
            from engine_core.kernels.paged_attention import (
                causal_attention,
                paged_attention,
            )
            from engine_core.kernels.reshape_and_cache import reshape_and_cache
            if not paged:
                o = causal_attention(q, k, v, md, self.scale)
            else:
                if rope is not None:
                    rotary_emb, positions = rope
                    rotary_emb.rotate_and_cache(positions, q, k, v, kv_cache, md.slot_mapping)
                else:
                    reshape_and_cache(k, v, kv_cache, md.slot_mapping)
                o = paged_attention(q, kv_cache, md, self.scale)
        elif not paged:
            o = causal_attention_ref(q, k, v, md, self.scale)
        else:
            write_kv_cache_ref(k, v, kv_cache, md.slot_mapping, padded=kv_cache.is_cuda)  # only graphs pad
            o = paged_attention_ref(q, kv_cache, md, self.scale)
        return o.reshape(-1, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, scale={self.scale:.4g}"
