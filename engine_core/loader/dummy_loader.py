"""Random weights for benchmarking a config without a checkpoint: normal(0, std) with a fixed seed,
RMSNorm weights = 1. Generated directly on the parameters' device."""
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
        p.normal_(0.0, std, generator=g)
