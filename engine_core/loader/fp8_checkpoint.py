"""Pre-quantized fp8 checkpoints: an HF directory whose linear weights (all but the LM head) are
e4m3 with a per-output-channel `weight_scale` (the compressed-tensors / vLLM "channel" layout:
`<layer>.weight` float8_e4m3fn [N, K], `<layer>.weight_scale` float32 [N, 1]), and a config.json
with quantization_config {"quant_method": "fp8", "activation_scheme": "dynamic"}.

`save` writes one (engine_core.tools.quantize_fp8: GPTQ-rounded weights); `load_model` reads one
with `--quantization fp8`: `prepare` swaps the linear layers for empty Fp8Linear layers before the
checkpoint is read, each exposing placeholder parameters `weight` and `weight_scale` whose
weight_loaders copy (shards of fused qkv / gate_up) rows as they are; `finish` drops the
placeholders. The weights are served as stored, not re-quantized.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from engine_core.layers.fp8_linear import FP8, Fp8Linear
from engine_core.layers.linear import Linear
from engine_core.layers.quantization import replace_module
from engine_core.layers.quantized_load import (
    restore_bias_buffer,
    row_placeholder,
    shards_of,
)

QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_scheme": "per_channel",
                       "ignored_layers": ["lm_head"]}


def is_fp8_checkpoint(model_dir: str) -> bool:
    """config.json's quantization_config says fp8."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    return qc.get("quant_method") == "fp8"


def _load_fp8_rows(layer: Fp8Linear, row: int, rows: int, loaded: torch.Tensor) -> None:
    """Rows [row, row + rows) of the e4m3 weight from a checkpoint tensor (stored as qweight_t.t())."""
    if loaded.dtype != FP8 or tuple(loaded.shape) != (rows, layer.in_features):
        raise ValueError(f"expected e4m3 [{rows}, {layer.in_features}], checkpoint has "
                         f"{loaded.dtype} {tuple(loaded.shape)}")
    layer.qweight_t.t()[row:row + rows].copy_(loaded)


def _load_fp8_scales(layer: Fp8Linear, row: int, rows: int, loaded: torch.Tensor) -> None:
    """Rows [row, row + rows) of the per-channel scales ([N] or [N, 1] in the checkpoint)."""
    if loaded.numel() != rows or loaded.dim() > 2:
        raise ValueError(f"expected {rows} per-channel scales, checkpoint has {tuple(loaded.shape)}")
    layer.scales[0, row:row + rows].copy_(loaded.reshape(-1))


def prepare(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap every linear layer but the LM head for an empty Fp8Linear with placeholder parameters."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, Linear) or name.endswith("lm_head"):
            continue
        device = m.weight.device
        empty = (torch.empty(m.out_features, m.in_features, dtype=FP8, device=device),
                 torch.empty(m.out_features, device=device))
        new = Fp8Linear(m, dtype, empty)
        shards = shards_of(m)
        if m.bias is not None:  # loaded through its own loader as a parameter, a buffer again in finish
            del new.bias
            new.bias = m.bias
        new.weight = row_placeholder(new, shards, _load_fp8_rows)
        new.weight_scale = row_placeholder(new, shards, _load_fp8_scales)
        replace_module(model, name, new)


def finish(model: nn.Module) -> None:
    """Drop the placeholders (biases become buffers again); every row must have been filled."""
    for name, m in model.named_modules():
        if not isinstance(m, Fp8Linear):
            continue
        for attr in ("weight", "weight_scale"):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter) and hasattr(p, "all_filled"):
                if not p.all_filled():
                    raise ValueError(f"fp8 checkpoint lacks (some shards of) {name}.{attr}")
                delattr(m, attr)
        restore_bias_buffer(m)


def _hf_names(model: nn.Module, module_name: str, leaf: str) -> list[tuple[str, int, int]]:
    """(checkpoint name, first row, rows) of our parameter `module_name.leaf`: one entry, or one per
    shard of a fused layer (qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj)."""
    m = model.get_submodule(module_name)
    ours = f"{module_name}.{leaf}"
    if not isinstance(m, Linear):
        return [(ours, 0, -1)]
    shards = shards_of(m)
    if len(shards.sizes) == 1:
        return [(ours, 0, shards.sizes[0])]
    inverse = {(our, sid): hf for hf, (our, sid) in model.packed_modules_mapping.items()}
    out = []
    for i, (row, rows) in enumerate(zip(shards.offsets, shards.sizes)):
        sid = shards.names[i] if shards.names else i
        part = next(our for our, s in inverse if s == sid and our in f"{module_name}.")
        out.append((f"{module_name}.".replace(part, inverse[(part, sid)]) + leaf, row, rows))
    return out


def save(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], hf_config: dict,
         output_dir: str) -> None:
    """Write `model` as an fp8 checkpoint: the linear layers named in `weights` (module name ->
    (e4m3 [N, K], fp32 scales [N])) as e4m3 + weight_scale, every other parameter as it is, under
    HF names (fused layers split again); config.json = `hf_config` + quantization_config."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for pname, p in model.named_parameters():  # tied LM head / embedding: listed once
        module_name, _, leaf = pname.rpartition(".")
        quantized = leaf == "weight" and module_name in weights
        for hf_name, row, rows in _hf_names(model, module_name, leaf):
            if quantized:
                q, scale = weights[module_name]
                tensors[hf_name] = q[row:row + rows].contiguous().cpu()
                tensors[hf_name + "_scale"] = scale[row:row + rows, None].float().contiguous().cpu()
            else:
                t = p.detach() if rows < 0 else p.detach()[row:row + rows]
                tensors[hf_name] = t.contiguous().cpu()
    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**hf_config, "quantization_config": QUANTIZATION_CONFIG}, f, indent=2)
