"""Quantize while loading (`--quantization int8|int4` on the CPU): the linear layers become empty
quantized layers *before* the checkpoint is read, and every checkpoint tensor (or shard of a fused
qkv / gate_up layer) goes straight into its packed rows. The full-precision linear weights are
never written, so they never become resident (their torch.empty pages are untouched), and a GGUF
Q4_1 tensor goes into an int4 layer as its codes, without a float32 detour.

Both schemes quantize each output row on its own (int8: a scale per row; int4: groups along the
row), so quantizing shard by shard gives exactly what quantizing the fused weight gave.

The models' `load_weights` is unchanged: each quantized layer exposes an empty placeholder
parameter named `weight` whose weight_loader routes (shard, tensor) to `load_rows`; `finish`
removes the placeholders once the checkpoint is read and checks that every row was filled.
The LM head and the embedding (tied in small models) are loaded in full precision and quantized
afterwards by quantize_model, as before.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from engine_core.layers.linear import Linear, MergedLinear, QKVLinear
from engine_core.layers.quantization import (
    INT4_PACK_BLOCK_N,
    Int4Linear,
    Int8Linear,
    _CpuQuantLinear,
    replace_module,
)


@dataclass
class Shards:
    """Row geometry of a (possibly fused) linear layer: shard i owns rows offsets[i]..+sizes[i]."""

    names: list
    sizes: list[int]
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def index(self, shard_id) -> int:
        i = self.names.index(shard_id) if shard_id in self.names else shard_id
        if not isinstance(i, int) or not 0 <= i < len(self.sizes):
            raise ValueError(f"unknown shard {shard_id!r}")
        return i


def shards_of(linear: Linear) -> Shards:
    if isinstance(linear, MergedLinear):
        names = ["q", "k", "v"] if isinstance(linear, QKVLinear) else []
        return Shards(names, list(linear.output_sizes))
    return Shards([], [linear.out_features])


def row_placeholder(layer: nn.Module, shards: Shards,
                    fill: Callable[[nn.Module, int, int, torch.Tensor], None]) -> nn.Parameter:
    """An empty parameter whose weight_loader(param, loaded, shard_id=None) calls
    fill(layer, first row, rows, loaded) for the rows of that shard (without shard_id: the whole
    layer); `all_filled()` says whether every shard came. `layer` is held weakly (no reference cycle)."""
    ref = weakref.ref(layer)
    filled = [False] * len(shards.sizes)

    def loader(param: nn.Parameter, loaded, shard_id=None) -> None:
        if shard_id is None:
            index, row, rows = None, 0, sum(shards.sizes)
        else:
            index = shards.index(shard_id)
            row, rows = shards.offsets[index], shards.sizes[index]
        with torch.no_grad():
            fill(ref(), row, rows, loaded)
        for i in range(len(filled)) if index is None else [index]:
            filled[i] = True

    p = nn.Parameter(torch.empty(0), requires_grad=False)
    p.weight_loader = loader
    p.all_filled = lambda: all(filled)
    return p


def restore_bias_buffer(m: nn.Module) -> None:
    """A bias loaded as a parameter (through its own loader) becomes the plain buffer it was."""
    if isinstance(m.bias, nn.Parameter):
        bias = m.bias.data
        del m.bias
        m.register_buffer("bias", bias)


def _load_quantized_rows(layer: _CpuQuantLinear, row: int, rows: int, loaded) -> None:
    expected = (rows, layer.in_features)
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch: expected {expected}, checkpoint has {tuple(loaded.shape)}")
    layer.load_rows(row, loaded)


def _make_empty(linear: Linear, method: str, shards: Shards) -> _CpuQuantLinear | None:
    if method == "int4" and Int4Linear.supports(linear) and all(s % INT4_PACK_BLOCK_N == 0 for s in shards.sizes):
        return Int4Linear(linear, empty=True)
    if method in ("int4", "int8"):
        return Int8Linear(linear, empty=True)
    return None


def prepare(model: nn.Module, method: str) -> int:
    """Swap every linear layer but the LM head for an empty quantized one with a placeholder
    `weight`. Returns how many were swapped (0: nothing to do for this method)."""
    if method not in ("int4", "int8"):
        return 0
    swapped = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, Linear) or name.endswith("lm_head"):
            continue
        shards = shards_of(m)
        new = _make_empty(m, method, shards)
        if new is None:
            continue
        if m.bias is not None:  # keeps its own loader (the bias is tiny): loaded as a parameter
            del new.bias
            new.bias = m.bias
        new.weight = row_placeholder(new, shards, _load_quantized_rows)
        replace_module(model, name, new)
        swapped += 1
    return swapped


def finish(model: nn.Module) -> None:
    """Drop the placeholders (and make loaded biases plain buffers again); every row must be filled."""
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, _CpuQuantLinear) and isinstance(w, nn.Parameter) and hasattr(w, "all_filled"):
            if not w.all_filled():
                raise ValueError(f"checkpoint lacks some shards of {name}.weight")
            del m.weight
            restore_bias_buffer(m)
