"""A GGUF Q4_1 tensor kept as its codes (`--quantization int4` loads it without going through fp32).

Q4_1 stores blocks of 32 values along a row: fp16 scale d, fp16 min m, 16 bytes of nibbles (low
nibbles: values 0..15, high nibbles: values 16..31); value = code * d + m. That is exactly
Int4Linear's format (groups of 32, scale and min), so the codes go straight into the packed layer.
Anything that wants floats instead (a layer that is not int4) calls `materialize()`, as it would
on a lazy safetensors slice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Q4_1_GROUP = 32
_Q4_1_BLOCK_BYTES = 20


@dataclass
class Q4_1Weight:
    codes: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K/32] float32 (d)
    min: torch.Tensor  # [N, K/32] float32 (m)

    @classmethod
    def from_blocks(cls, data: np.ndarray, shape: tuple[int, int]) -> Q4_1Weight:
        """data: the GGUF tensor's bytes, [N, K/32*20] uint8; shape: (N, K) in torch order."""
        n, k = shape
        blocks = np.ascontiguousarray(data).reshape(n, k // Q4_1_GROUP, _Q4_1_BLOCK_BYTES)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
        return cls(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def permute_rows(self, fn) -> Q4_1Weight:
        """Apply a row permutation (reverse_permute) to codes, scales and mins alike: Q4_1 groups
        run along a row, so rows move as a whole."""
        return Q4_1Weight(fn(self.codes).contiguous(), fn(self.scale).contiguous(), fn(self.min).contiguous())

    def materialize(self) -> torch.Tensor:
        """float32 [N, K], bit-identical to gguf-py's dequantize (d * q + m in float32)."""
        n, k = self.shape
        q = self.codes.view(n, k // Q4_1_GROUP, Q4_1_GROUP).float()
        return (self.scale[..., None] * q + self.min[..., None]).reshape(n, k)
