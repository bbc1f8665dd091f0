"""KV-cache write: scatter this step's K/V rows into their paged-cache slots.

Torch twin: engine_core.layers.attention.write_kv_cache_ref.

Cache layout per layer: kv_cache [2, num_blocks, block_size, Hkv, D] (0 = K, 1 = V), so slot s
(= block_id * block_size + offset) is one contiguous row of Hkv * D elements in each half.

One program per token copies its whole [Hkv, D] row for K and for V (Llama-8B: 8 x 128 = 1024
elements, 2 KiB in bf16 per half): the row is contiguous in the cache, so the store is a single
coalesced run. A negative slot marks a padding token (CUDA-graph padding): its store is masked
off. (The torch twin writes such rows to slot 0 of the reserved null block instead, because
filtering would need a host sync; nothing ever reads the null block, so both are equivalent.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    half_stride,  # elements between cache[0] (K) and cache[1] (V)
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: an fp8 cache, values saturate at +-FP8_MAX like the twin's clamp
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: a layer's cache can exceed 2^31 elements
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < HKV) & (d[None, :] < D) & (slot >= 0)
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    if FP8_MAX > 0:
        k = tl.minimum(tl.maximum(k.to(tl.float32), -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -FP8_MAX), FP8_MAX)
    dst = cache_ptr + slot * (HKV * D) + h[:, None] * D + d[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key/value: [T, Hkv, D] (any token/head strides, unit stride along D; e.g. views into the
    fused qkv projection output); kv_cache: contiguous [2, num_blocks, block_size, Hkv, D];
    slot_mapping: [T] int (negative = padding, skipped). Converts to the cache dtype."""
    if kv_cache.numel() == 0 or key.shape[0] == 0:
        return
    T, hkv, d = key.shape
    assert kv_cache.is_contiguous() and kv_cache.shape[-2:] == (hkv, d), (kv_cache.shape, key.shape)
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert value.shape == key.shape and slot_mapping.shape[0] >= T
    _reshape_and_cache_kernel[(T,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0),
        HKV=hkv, D=d, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
        FP8_MAX=448.0 if kv_cache.dtype == torch.float8_e4m3fn else 0.0, num_warps=4,
    )
