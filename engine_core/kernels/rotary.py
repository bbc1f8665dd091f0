"""Rotary position embedding (neox / HF rotate_half layout), applied in place to q and k.

Torch twin: engine_core.layers.rotary.apply_rotary_ref.

cos_sin_cache [max_position, rotary_dim] fp32 holds cos in the first half and sin in the second.
Channel i (< rotary_dim/2) pairs with channel i + rotary_dim/2:
    x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin        (fp32, then rounded to x's dtype)
Channels >= rotary_dim (partial rotary) are left untouched, which in place means: not written.

One program per token rotates all of its q heads and k heads: the token's cos/sin row is loaded
once and reused for every head. q and k may be strided views (e.g. slices of the fused qkv
projection output): in place there, the rotation costs one read and one write of q and k only.

`rotary_and_cache` also writes the token's rotated K and its V into their paged-cache slot (the
job of kernels.reshape_and_cache) in the same program: the rotated K goes straight from registers
to the cache (nothing reads K again from the projection output), one kernel fewer per layer. A
decode step is a chain of ~11 small kernels per layer, so each one removed is ~1-2 us per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine_core.kernels import pdl_launch_args


@triton.jit
def _rotate_heads(x_ptr, row_off, cos, sin, H, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < H) & (i[None, :] < HALF)
    p1 = x_ptr + row_off + h[:, None] * HEAD_DIM + i[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(p1, (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(p1 + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _rotate_q(pos_ptr, q_ptr, cos_sin_ptr, stride_qt, stride_cs, HQ, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
              BLOCK_HQ: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr):
    """Both kernels' start: wait for the previous kernel (kernels.pdl_enabled), load this token's
    cos/sin row (lanes i < HALF) and rotate its q heads in place. Returns (t, i, cos, sin)."""
    if USE_PDL:  # before any load: the previous kernel has completed
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0)
    _rotate_heads(q_ptr, t * stride_qt, cos, sin, HQ, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF)
    return t, i, cos, sin


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_kt, stride_cs,
    HQ, HK,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
):
    t, _i, cos, sin = _rotate_q(pos_ptr, q_ptr, cos_sin_ptr, stride_qt, stride_cs, HQ, HEAD_DIM, HALF, BLOCK_HQ,
                                BLOCK_HALF, USE_PDL)
    _rotate_heads(k_ptr, t * stride_kt, cos, sin, HK, HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF)


@triton.jit
def _rotary_and_cache_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, cache_ptr, slot_ptr,
    stride_qt, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    half_stride,  # elements between cache[0] (K) and cache[1] (V)
    HQ,
    HKV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: an fp8 cache, values saturate at +-FP8_MAX (as reshape_and_cache)
    USE_PDL: tl.constexpr,
):
    t, i, cos, sin = _rotate_q(pos_ptr, q_ptr, cos_sin_ptr, stride_qt, stride_cs, HQ, HEAD_DIM, HALF, BLOCK_HQ,
                               BLOCK_HALF, USE_PDL)

    slot = tl.load(slot_ptr + t).to(tl.int64)  # negative: a padding row, nothing written
    h = tl.arange(0, BLOCK_HK)
    dst = cache_ptr + slot * (HKV * HEAD_DIM) + h[:, None] * HEAD_DIM
    # K: the rotated halves, rounded to K's dtype as the in-place rotation would, then to the cache's
    m_rot = (h[:, None] < HKV) & (i[None, :] < HALF) & (slot >= 0)
    k1p = k_ptr + t * stride_kt + h[:, None] * stride_kh + i[None, :]
    k1 = tl.load(k1p, mask=m_rot, other=0.0)
    k2 = tl.load(k1p + HALF, mask=m_rot, other=0.0)
    k1f = k1.to(tl.float32)
    k2f = k2.to(tl.float32)
    r1 = (k1f * cos[None, :] - k2f * sin[None, :]).to(k1.dtype).to(tl.float32)
    r2 = (k2f * cos[None, :] + k1f * sin[None, :]).to(k1.dtype).to(tl.float32)
    # K channels past the rotary dims (partial rotary) and all of V: copied as they are
    d = tl.arange(0, BLOCK_D)
    m_row = (h[:, None] < HKV) & (d[None, :] < HEAD_DIM) & (slot >= 0)
    k_pass = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :],
                     mask=m_row & (d[None, :] >= 2 * HALF), other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m_row, other=0.0).to(tl.float32)
    if FP8_MAX > 0:
        r1 = tl.minimum(tl.maximum(r1, -FP8_MAX), FP8_MAX)
        r2 = tl.minimum(tl.maximum(r2, -FP8_MAX), FP8_MAX)
        k_pass = tl.minimum(tl.maximum(k_pass, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    out_ty = cache_ptr.dtype.element_ty
    tl.store(dst + i[None, :], r1.to(out_ty), mask=m_rot)
    tl.store(dst + HALF + i[None, :], r2.to(out_ty), mask=m_rot)
    tl.store(dst + d[None, :], k_pass.to(out_ty), mask=m_row & (d[None, :] >= 2 * HALF))
    tl.store(dst + half_stride + d[None, :], v.to(out_ty), mask=m_row)


def _as_rows(x: torch.Tensor, head_dim: int) -> tuple[int, int]:
    """(token stride, num heads) of x [T, H*head_dim] or [T, H, head_dim]; heads must be packed."""
    if x.dim() == 3:
        assert x.stride(1) == head_dim and x.stride(2) == 1, "heads must be packed in each token row"
        return x.stride(0), x.shape[1]
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % head_dim == 0
    return x.stride(0), x.shape[1] // head_dim


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq*head_dim] (or [T, Hq, head_dim]) and k likewise, in place, by the angles at
    positions [T]; cos_sin_cache [max_position, rotary_dim] fp32. Returns (q, k)."""
    T = positions.shape[0]
    if T == 0:
        return q, k
    stride_qt, hq = _as_rows(q, head_dim)
    stride_kt, hk = _as_rows(k, head_dim)
    assert cos_sin_cache.stride(-1) == 1
    half = cos_sin_cache.shape[-1] // 2
    _rotary_kernel[(T,)](
        positions, q, k, cos_sin_cache, stride_qt, stride_kt, cos_sin_cache.stride(0), hq, hk,
        HEAD_DIM=head_dim, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk), BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        **pdl_launch_args(q.device),
    )
    return q, k


def rotary_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q [T, Hq*head_dim] (or [T, Hq, head_dim]) in place, and write rotate(k) and v
    ([T, Hkv, head_dim] views, unit stride along head_dim) into kv_cache [2, num_blocks, block_size,
    Hkv, head_dim] at slot_mapping [T] (negative = padding, skipped). k itself is left unrotated.
    Same values as rotary_embedding followed by reshape_and_cache. Returns q."""
    T = positions.shape[0]
    if T == 0:
        return q
    stride_qt, hq = _as_rows(q, head_dim)
    _, hkv, d = k.shape
    assert d == head_dim and k.stride(-1) == 1 and v.stride(-1) == 1 and v.shape == k.shape
    assert kv_cache.is_contiguous() and kv_cache.shape[-2:] == (hkv, d) and slot_mapping.shape[0] >= T
    assert cos_sin_cache.stride(-1) == 1
    half = cos_sin_cache.shape[-1] // 2
    _rotary_and_cache_kernel[(T,)](
        positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping,
        stride_qt, k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        kv_cache.stride(0), hq,
        HKV=hkv, HEAD_DIM=head_dim, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hkv), BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(head_dim),
        FP8_MAX=448.0 if kv_cache.dtype == torch.float8_e4m3fn else 0.0, num_warps=4,
        **pdl_launch_args(q.device),
    )
    return q
