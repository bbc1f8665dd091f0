"""Rotary position embedding (neox / HF rotate_half layout), applied in place to q and k.

Torch twin: engine_core.layers.rotary.apply_rotary_ref.

cos_sin_cache [max_position, rotary_dim] fp32 holds cos in the first half and sin in the second.
Channel i (< rotary_dim/2) pairs with channel i + rotary_dim/2:
    x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin        (fp32, then rounded to x's dtype)
Channels >= rotary_dim (partial rotary) are left untouched, which in place means: not written.

One program per token rotates all of its q heads and k heads: the token's cos/sin row is loaded
once and reused for every head. q and k may be strided views (e.g. slices of the fused qkv
projection output): in place there, the rotation costs one read and one write of q and k only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_kt, stride_cs,
    HQ, HK,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=i < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i, mask=i < HALF, other=0.0)
    _rotate_heads(q_ptr, t * stride_qt, cos, sin, HQ, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, t * stride_kt, cos, sin, HK, HEAD_DIM, HALF, BLOCK_HK, BLOCK_HALF)


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
    )
    return q, k
