"""GPTQ fp8 rounding (engine_core/layers/gptq_fp8.py) and pre-quantized fp8 checkpoints
(engine_core/loader/fp8_checkpoint.py): lower output error than round-to-nearest on correlated
inputs, same scales, and a checkpoint that loads back bit for bit into Fp8Linear layers."""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine_core.layers import fp8_linear
from engine_core.layers.fp8_linear import FP8, Fp8Linear, quantize_fp8_per_channel
from engine_core.layers.gptq_fp8 import GptqConfig, gptq_fp8
from engine_core.layers.gptq_model import swap_in_fp8
from engine_core.layers.linear import Linear
from engine_core.loader import fp8_checkpoint, load_model

CPU = torch.device("cpu")


def _correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated channels and a few large ones, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 8, generator=g) @ torch.randn(k // 8, k, generator=g)
    x += 0.1 * torch.randn(rows, k, generator=g)
    return x * torch.rand(k, generator=g).pow(4).mul(10).add(0.1)


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    return (x @ w.t() - x @ (q.float() * scale[:, None]).t()).norm().item()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_round_to_nearest(act_order):
    torch.manual_seed(0)
    n, k = 96, 256
    w = torch.randn(n, k)
    x = _correlated_inputs(2560, k, seed=1)
    x_cal, x_test = x[:2048], x[2048:]  # held-out rows from the same distribution
    q, scale = gptq_fp8(w, x_cal.t().double() @ x_cal.double(), GptqConfig(act_order=act_order, block_size=32))
    q_rtn, scale_rtn = quantize_fp8_per_channel(w)
    assert q.dtype == FP8 and q.shape == (n, k)
    torch.testing.assert_close(scale, scale_rtn, rtol=0, atol=0)  # the kernels' scales are unchanged
    gptq, rtn = _output_error(x_test, w, q, scale), _output_error(x_test, w, q_rtn, scale_rtn)
    assert gptq < 0.5 * rtn, (gptq, rtn)  # measured: 0.06 with act-order, 0.40 without


def test_gptq_block_size_does_not_change_the_result():
    torch.manual_seed(0)
    w, x = torch.randn(32, 128), _correlated_inputs(512, 128, seed=3)
    h = x.t().double() @ x.double()
    a, _ = gptq_fp8(w, h, GptqConfig(block_size=128))
    b, _ = gptq_fp8(w, h, GptqConfig(block_size=16))
    assert (a.float() != b.float()).float().mean() < 0.01  # fp32 summation order only


def test_gptq_dead_inputs_and_identity_hessian():
    """A Hessian with zero rows (inputs never active) works; an identity Hessian is plain rounding."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q_rtn, _ = quantize_fp8_per_channel(w)
    q, _ = gptq_fp8(w, torch.eye(64), GptqConfig(damp=0.0))
    assert torch.equal(q.float(), q_rtn.float())
    h = torch.eye(64)
    h[5, 5] = 0
    q, _ = gptq_fp8(w, h)
    assert torch.isfinite(q.float()).all()


@pytest.fixture()
def dummy_config(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_fp8_checkpoint_round_trip(dummy_config, tmp_path, monkeypatch):
    """save() splits the fused qkv / gate_up layers under HF names (q/k/v biases too: Qwen2);
    load_model(--quantization fp8) serves the stored e4m3 codes and scales as they are."""
    monkeypatch.setattr(fp8_linear, "check_fp8_supported", lambda device: None)
    model = load_model(f"dummy:{dummy_config}", "float32", "cpu")
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear) and not name.endswith("lm_head"):
            q, scale = quantize_fp8_per_channel(m.weight.data * 3)  # differs from RTN of the weight
            weights[name] = (q, scale * 1.01)
    out = tmp_path / "fp8"
    fp8_checkpoint.save(model, weights, json.loads(dummy_config.read_text()), str(out))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == FP8
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").shape == (128, 1)
    assert {"model.layers.1.self_attn.v_proj.bias", "model.layers.1.mlp.gate_proj.weight", "lm_head.weight"} <= names
    assert not any("qkv_proj" in n or "gate_up" in n for n in names)

    with pytest.raises(ValueError, match="--quantization fp8"):
        load_model(str(out), "float32", "cpu")
    served = load_model(str(out), "float32", "cpu", quantization="fp8")
    expected = swap_in_fp8(model, weights, torch.float32)
    for name, (q, scale) in weights.items():
        layer = served.get_submodule(name)
        assert isinstance(layer, Fp8Linear)
        assert torch.equal(layer.qweight_t.t().view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(layer.scales[0], scale), name
        assert "weight" not in dict(layer.named_parameters())
    x = torch.randn(5, 64)
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"):
        m = expected.get_submodule(name)
        xin = x if m.in_features == 64 else torch.randn(5, m.in_features)
        torch.testing.assert_close(served.get_submodule(name)(xin), m(xin), rtol=0, atol=0)
    assert os.path.getsize(out / "model.safetensors") > 0
