"""SiLU-and-multiply for gated MLPs: x = [gate | up] -> silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.kernels import triton_available


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_available():
            from engine_core.kernels.silu_and_mul import silu_and_mul
            return silu_and_mul(x)
        if x.device.type == "cpu":
            from engine_core.kernels.cpu_ops import cpu_ops
            ops = cpu_ops()
            if ops is not None:  # C++ (kernels/cpu_decode_ops.cpp): one call instead of three ops
                if x.dim() == 2:
                    return ops.silu_and_mul(x)
                out = ops.silu_and_mul(x.reshape(-1, x.shape[-1]))
                return out.view(*x.shape[:-1], out.shape[-1])
        return silu_and_mul_ref(x)
