"""SiLU-and-multiply for gated MLPs: x = [gate | up] -> silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_ref(x)
