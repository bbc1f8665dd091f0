"""GPTQ rounding of one weight matrix to e4m3 with per-output-channel scales (Frantar et al. 2022).

Round-to-nearest gives every weight its own ~3 % rounding error. GPTQ rounds the input columns one
at a time and moves each column's error onto the columns not rounded yet, weighted by the inverse
Hessian H = 2 X^T X of the layer's calibration inputs, so that the layer's *output* error
||X W^T - X Q^T|| is small rather than the weight error. The scale stays amax / 448 of the original
row (what `fp8_linear.quantize_fp8_per_channel` computes), so the GEMM kernels and the checkpoint
layout are those of round-to-nearest; only which e4m3 value each weight becomes changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_core.layers.fp8_linear import fp8_channel_scales, to_e4m3


@dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns rounded per lazy-batch update (speed only, same result)
    act_order: bool = True  # round the columns of largest H_jj (most input energy) first


def _round_e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w through e4m3 with `scale` (same shape or broadcastable), back in fp32."""
    return to_e4m3(w, scale).float() * scale


@torch.no_grad()
def gptq_fp8(weight: torch.Tensor, hessian: torch.Tensor, config: GptqConfig | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] (X^T X of the layer's inputs; any positive factor) ->
    (e4m3 [N, K], fp32 scales [N]) with weight ~= q * scale[:, None], as quantize_fp8_per_channel."""
    config = config or GptqConfig()
    w = weight.detach().float()
    k = w.shape[1]
    scale = fp8_channel_scales(w)
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True) if config.act_order else torch.arange(k, device=h.device)
    h = h[perm][:, perm]
    h.diagonal().add_(config.damp * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row j holds how column j's error spreads over columns > j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    wt = w.t()[perm].contiguous()  # [K, N]: column j of the weight is row j here (contiguous)
    wt[dead[perm]] = 0.0
    for b0 in range(0, k, config.block_size):
        b1 = min(b0 + config.block_size, k)
        block, hb = wt[b0:b1], hinv[b0:b1, b0:b1]
        err = torch.empty_like(block)
        for j, d in enumerate(hb.diagonal().tolist()):
            rounded = _round_e4m3(block[j], scale)
            torch.sub(block[j], rounded, out=err[j]).div_(d)
            block[j + 1:].addr_(hb[j, j + 1:], err[j], alpha=-1.0)  # the error onto the later columns
            block[j] = rounded
        wt[b1:].addmm_(hinv[b0:b1, b1:].t(), err, alpha=-1.0)  # the block's errors onto the columns after it
    q = wt[torch.argsort(perm)].t()
    return to_e4m3(q, scale[:, None]), scale
