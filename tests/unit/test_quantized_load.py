"""Quantize while loading (engine_core/layers/quantized_load.py): the same packed weights as
quantizing the loaded float model, GGUF Q4_1 codes kept exactly, fused shards packed one by one,
and a lower load peak (the float linear weights are never materialised)."""
from __future__ import annotations

import pytest
import torch

from engine_core.layers import quantized_load
from engine_core.layers.linear import MergedLinear, QKVLinear
from engine_core.layers.quantization import Int4Linear, Int8Linear
from engine_core.loader.gguf_loader import (
    dequantize_tensor,
    iter_gguf_weights,
    open_gguf,
)
from engine_core.loader.gguf_q4_1 import Q4_1Weight
from engine_core.loader.model_source import resolve_model


def test_q4_1_codes_dequantize_like_gguf_py(gguf_path):
    """Q4_1Weight.materialize is bit-identical to gguf-py's dequantize, permuted q/k rows included."""
    source = resolve_model(gguf_path)
    reader = open_gguf(source.path)
    floats = dict(iter_gguf_weights(reader, source.config))
    n = 0
    for name, w in iter_gguf_weights(reader, source.config, keep_q4_1=True):
        if isinstance(w, Q4_1Weight):
            assert torch.equal(w.materialize(), floats[name]), name
            n += 1
        if n >= 12:
            break
    assert n == 12  # the embedded model is Q4_1


def test_int4_from_q4_1_codes_equals_requantized_floats(gguf_path):
    source = resolve_model(gguf_path)
    tensor = next(t for t in open_gguf(source.path).tensors if t.name == "blk.0.ffn_gate.weight")
    floats = torch.from_numpy(dequantize_tensor(tensor))
    codes = Q4_1Weight.from_blocks(tensor.data, tuple(floats.shape))
    lin = MergedLinear(floats.shape[1], [floats.shape[0]])
    lin.weight.data.copy_(floats)
    old = Int4Linear(lin)  # float -> re-quantized (the pre-load-time path)
    new = Int4Linear(lin, empty=True)
    new.load_rows(0, codes)
    old_bufs, new_bufs = dict(old.named_buffers()), dict(new.named_buffers())
    assert old_bufs.keys() == new_bufs.keys() and "qweight" in old_bufs
    for name, buf in old_bufs.items():
        assert torch.equal(buf, new_bufs[name]), name


@pytest.mark.parametrize("method,cls", [("int4", Int4Linear), ("int8", Int8Linear)])
def test_fused_shards_loaded_one_by_one_equal_the_fused_quantization(method, cls):
    torch.manual_seed(0)
    qkv = QKVLinear(128, 64, num_heads=4, num_kv_heads=2, bias=True)
    shards = {"q": torch.randn(256, 128), "k": torch.randn(128, 128), "v": torch.randn(128, 128)}
    bias = torch.randn(512)
    qkv.weight.data.copy_(torch.cat(list(shards.values())))
    qkv.bias.data.copy_(bias)
    ref = cls(qkv)
    model = torch.nn.Sequential()
    model.add_module("qkv_proj", qkv)
    assert quantized_load.prepare(model, method) == 1
    layer = model.qkv_proj
    assert isinstance(layer, cls) and layer.weight.numel() == 0
    for sid in ("v", "q", "k"):  # any order
        layer.weight.weight_loader(layer.weight, shards[sid], sid)
    layer.bias.weight_loader(layer.bias, bias[:256], "q")
    layer.bias.weight_loader(layer.bias, bias[256:384], "k")
    layer.bias.weight_loader(layer.bias, bias[384:], "v")
    quantized_load.finish(model)
    assert not list(model.parameters())  # placeholders gone, the bias is a buffer again
    for name, buf in ref.named_buffers():
        assert torch.equal(buf, getattr(layer, name)), name
    x = torch.randn(3, 128)
    assert torch.equal(ref(x), layer(x))


def test_a_missing_shard_is_an_error():
    model = torch.nn.Sequential()
    model.add_module("gate_up_proj", MergedLinear(64, [128, 128]))
    quantized_load.prepare(model, "int4")
    layer = model.gate_up_proj
    layer.weight.weight_loader(layer.weight, torch.randn(128, 64), 0)
    with pytest.raises(ValueError, match="lacks some shards"):
        quantized_load.finish(model)
