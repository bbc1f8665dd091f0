"""GPTQ-quantize a whole model to fp8, decoder layer by decoder layer (Frantar et al. 2022, sec. 4).

The calibration sequences run through the model once up to the first decoder layer; then, layer by
layer, the inputs of each of its linear layers are collected (X^T X), every linear layer is rounded
by `gptq_fp8`, its weight replaced in place by the rounded one, and the layer runs again to give the
next layer its inputs: later layers are calibrated on what the quantized earlier layers produce.

Works for the decoder models of engine_core.models (`model.model.layers`, each called as
layer(positions, hidden, residual, kv_cache, md) -> (hidden, residual)). The LM head is not touched
(fp8 keeps it in the model dtype).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from engine_core.layers.fp8_linear import Fp8Linear
from engine_core.layers.gptq_fp8 import GptqConfig, gptq_fp8
from engine_core.layers.linear import Linear
from engine_core.layers.quantization import replace_module
from engine_core.perplexity import no_cache_metadata

Fp8Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (e4m3 [N, K], fp32 scales [N])


class _Stop(Exception):
    pass


def _run(layer: nn.Module, args: list) -> tuple[torch.Tensor, torch.Tensor]:
    """layer(*args) on copies of hidden and residual (fused add + RMSNorm updates them in place)."""
    positions, hidden, residual, *rest = args
    return layer(positions, hidden.clone(), None if residual is None else residual.clone(), *rest)


def _accumulate(hessian: torch.Tensor, _mod: nn.Module, args: tuple) -> None:
    """Forward pre-hook: hessian += X^T X of the layer's input rows."""
    x = args[0].reshape(-1, args[0].shape[-1]).float()
    hessian.addmm_(x.t(), x)


def _first_layer_inputs(model: nn.Module, sequences: Sequence[Sequence[int]], device: torch.device) -> list[list]:
    """The positional arguments decoder layer 0 gets for each calibration sequence."""
    captured: list[list] = []

    def grab(_mod, args):
        captured.append(list(args))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab)
    try:
        for seq in sequences:
            n = len(seq)
            ids = torch.tensor(list(seq), dtype=torch.int64, device=device)
            try:
                model(ids, torch.arange(n, device=device), None, no_cache_metadata(n, device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def gptq_fp8_model(model: nn.Module, sequences: Sequence[Sequence[int]],
                   config: GptqConfig | None = None) -> Fp8Weights:
    """Round every linear layer of `model`'s decoder layers to e4m3 with GPTQ, calibrated on
    `sequences` (token ids; each runs as one causal prefill). The model's weights are replaced by
    their rounded values in place; returns the e4m3 weights and scales by module name."""
    device = next(model.parameters()).device
    inputs = _first_layer_inputs(model, sequences, device)
    out: Fp8Weights = {}
    for i, layer in enumerate(model.model.layers):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, Linear)}
        hessians = {name: torch.zeros(m.in_features, m.in_features, device=device)
                    for name, m in linears.items()}

        handles = [m.register_forward_pre_hook(functools.partial(_accumulate, hessians[name]))
                   for name, m in linears.items()]
        try:
            for args in inputs:
                _run(layer, args)
        finally:
            for h in handles:
                h.remove()
        for name, m in linears.items():
            q, scale = gptq_fp8(m.weight, hessians[name], config)
            m.weight.copy_((q.float() * scale[:, None]).to(m.weight.dtype))
            out[f"model.layers.{i}.{name}"] = (q, scale)
        for args in inputs:  # this layer's outputs, through its rounded weights, feed the next
            args[1], args[2] = _run(layer, args)
    return out


def swap_in_fp8(model: nn.Module, weights: Fp8Weights, dtype: torch.dtype) -> nn.Module:
    """Replace the named linear layers by Fp8Linear layers holding `weights`, in place."""
    for name, (q, scale) in weights.items():
        lin = model.get_submodule(name)
        replace_module(model, name, Fp8Linear(lin, dtype, (q.to(lin.weight.device), scale.to(lin.weight.device))))
    return model
