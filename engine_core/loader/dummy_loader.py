"""Random weights for benchmarking a config without a checkpoint: normal(0, std) with a fixed seed,
RMSNorm weights = 1. Generated directly on the parameters' device.

A tensor-parallel shard draws the full (unsharded) tensor of each parameter, in the same order and
from the same generator as the single-device model, and keeps its slice through the parameter's
weight_loader: every TP size builds the same model, so greedy tokens can be compared across sizes.
"""
from __future__ import annotations

import torch
from torch import nn

from engine_core.layers.layernorm import RMSNorm


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generators: dict[torch.device, torch.Generator] = {}
    for _, p in model.named_parameters():
        if id(p) in norm_params:
            p.fill_(1.0)
            continue
        g = generators.get(p.device)
        if g is None:
            g = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        full_shape = tuple(getattr(p, "full_shape", p.shape))
        if full_shape == tuple(p.shape):
            p.normal_(0.0, std, generator=g)
        else:  # a shard: draw the whole tensor (one at a time), keep this rank's slice
            full = torch.empty(full_shape, dtype=p.dtype, device=p.device).normal_(0.0, std, generator=g)
            p.weight_loader(p, full)
            del full
