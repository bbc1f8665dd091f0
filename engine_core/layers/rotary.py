"""Rotary position embedding (neox / HF `rotate_half` layout) with a cos/sin cache indexed by position.

Pairs channel i with channel i + rotary_dim/2 (not interleaved pairs), exactly as HF Llama/Qwen.
Scaling types: "linear" (positions / factor) and "llama3" (Llama-3.1 frequency smoothing).
The cache is float32 and the rotation is computed in float32, then cast back to q/k's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine_core.kernels import triton_available


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim/2] float32 on CPU (same arithmetic as transformers)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling["rope_type"]
    factor = float(rope_scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_context_len = float(rope_scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between is interpolated
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: linear, llama3")


def compute_cos_sin_cache(rotary_dim: int, max_position: int, base: float,
                          rope_scaling: dict | None = None) -> torch.Tensor:
    """[max_position, rotary_dim] float32: first half cos, second half sin (vLLM layout)."""
    inv_freq = compute_inv_freq(rotary_dim, base, rope_scaling)
    t = torch.arange(max_position, dtype=torch.float32, device="cpu")
    freqs = torch.outer(t, inv_freq)  # [P, rotary_dim/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary_ref(positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int, cos_sin: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [T, H*head_dim] (or [T, H, head_dim]) by the angles at `positions` [T].

    Only the first rotary_dim = cos_sin_cache.shape[-1] channels of each head rotate.
    cos_sin: the cache rows at `positions`, if the caller already gathered them.
    """
    shape = x.shape
    t = positions.shape[0]
    x = x.reshape(t, -1, head_dim)
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    if cos_sin is None:
        cos_sin = cos_sin_cache.index_select(0, positions.reshape(-1).long())
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    xr = x[..., :rotary_dim].float()
    x1, x2 = xr[..., :half], xr[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if rotary_dim < head_dim:
        out = torch.cat([out, x[..., rotary_dim:]], dim=-1)
    return out.reshape(shape)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None, rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        cache = compute_cos_sin_cache(self.rotary_dim, max_position, base, rope_scaling)
        # Non-persistent: never in a state_dict. Built on CPU, moved to the ambient default device
        # (the loader constructs models under `with torch.device(target)`).
        self.register_buffer("cos_sin_cache", cache.to(torch.empty(0).device), persistent=False)
        self._rows_for: torch.Tensor | None = None  # positions of the last step (torch path)
        self._rows: torch.Tensor | None = None  # cos_sin_cache rows at those positions

    def _apply(self, fn, recurse=True):
        # follow device moves, but keep the cache float32 when the model is cast (model.half())
        cache = self.cos_sin_cache
        super()._apply(fn, recurse)
        if self.cos_sin_cache.dtype != torch.float32:
            self.cos_sin_cache = cache.to(self.cos_sin_cache.device)
        return self

    def _cache_on(self, device: torch.device) -> torch.Tensor:
        """cos_sin_cache on `device` (moved there once, on first use)."""
        if self.cos_sin_cache.device != device:
            self.cos_sin_cache = self.cos_sin_cache.to(device)
        return self.cos_sin_cache

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._cache_on(positions.device)
        if q.is_cuda and triton_available():  # Triton: rotates q and k in place (views into qkv)
            from engine_core.kernels.rotary import rotary_embedding
            return rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim)
        if positions.is_cuda:  # (a CUDA graph's static positions buffer changes in place: no reuse)
            return (apply_rotary_ref(positions, q, self.cos_sin_cache, self.head_dim),
                    apply_rotary_ref(positions, k, self.cos_sin_cache, self.head_dim))
        # Every layer rotates by the same positions tensor within a step: gather its rows once.
        if self._rows_for is not positions:
            self._rows_for = positions
            self._rows = self.cos_sin_cache.index_select(0, positions.reshape(-1).long())
        qk = _joined(q, k)
        if qk is not None:  # q | k side by side in qkv: one rotation (same arithmetic, half the ops)
            out = apply_rotary_ref(positions, qk, self.cos_sin_cache, self.head_dim, self._rows)
            return out.split([q.shape[-1], k.shape[-1]], dim=-1)
        return (apply_rotary_ref(positions, q, self.cos_sin_cache, self.head_dim, self._rows),
                apply_rotary_ref(positions, k, self.cos_sin_cache, self.head_dim, self._rows))

    def rotate_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Paged path: rotate q in place and write rotate(k), v into their cache slots in one call --
        the Triton kernel on CUDA (kernels.rotary.rotary_and_cache), the C++ op on CPU
        (kernels/cpu_decode_ops.cpp, which also leaves k rotated in place). Returns q."""
        cache = self._cache_on(positions.device)
        if q.is_cuda:
            from engine_core.kernels.rotary import rotary_and_cache
            return rotary_and_cache(positions, q, k, v, cache, self.head_dim, kv_cache, slot_mapping)
        from engine_core.kernels.cpu_ops import cpu_ops
        positions, slot_mapping = cpu_rotary_indices(positions, slot_mapping)
        cpu_ops().rotary_qk_cache_(q, k, v, positions, cache, self.head_dim, kv_cache, slot_mapping)
        return q


def cpu_rotary_indices(positions: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and KV-cache slots as the C++ rotary_qk_cache_ takes them: 1-D int64."""
    if positions.dim() != 1 or positions.dtype != torch.long:
        positions = positions.reshape(-1).long()
    if slot_mapping.dtype != torch.long:
        slot_mapping = slot_mapping.long()
    return positions, slot_mapping


def _joined(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, Nq] and [T, Nk] views that sit side by side in one [T, >= Nq+Nk] buffer (the split of
    the fused qkv output) -> the [T, Nq+Nk] view covering both; None otherwise. Decode rotates
    30 layers' q and k every step, so one call instead of two saves ~10 small ops per layer."""
    if (q.dim() != 2 or k.dim() != 2 or q.dtype != k.dtype or q.stride(1) != 1 or k.stride(1) != 1
            or q.stride(0) != k.stride(0) or q.shape[0] != k.shape[0]
            or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
            or k.storage_offset() != q.storage_offset() + q.shape[1]):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1]), q.stride(), q.storage_offset())


def get_rope(head_dim: int, max_position: int, base: float, rope_scaling: dict | None = None) -> RotaryEmbedding:
    """Build one RotaryEmbedding; a model builds it once and shares it between its layers
    (the Llama-3.1 cache is 131072 x 128 float32 = 64 MiB, too big to copy per layer)."""
    return RotaryEmbedding(head_dim, max_position, base, rope_scaling)
