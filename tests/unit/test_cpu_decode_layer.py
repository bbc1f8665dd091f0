"""The CPU decode fast path (engine_core/models/cpu_decode_layer.py) against the modules' forwards.

Both run the same kernels, so a schedule of chunked prefills and decodes must give bit-identical
logits with the fast path on and off, for plain (fp32, bf16) and quantized (int8, int4) layers, and
the fast path must actually have run the decode steps (and only those).
"""
from __future__ import annotations

import copy

import pytest
import torch

from engine_core.kernels.cpu_ops import cpu_ops, cpu_ops_status
from engine_core.layers.quantization import quantize_model
from engine_core.model_config import ModelConfig
from engine_core.models import cpu_decode_layer
from engine_core.models.registry import get_model_class
from tests.unit.test_models import MiniRunner, run_mixed_schedule

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason=cpu_ops_status())

# Shapes the int4 pack accepts (output rows in blocks of 64, input in groups of 32).
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 512, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def _tiny_model(dtype: torch.dtype, quantization: str | None, **overrides):
    config = ModelConfig.from_hf_config({**TINY, **overrides})
    g = torch.Generator().manual_seed(0)
    model = get_model_class(config.architecture)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(1.0)
    model = model.to(dtype).eval()
    if quantization:
        model = quantize_model(model, quantization, torch.device("cpu"), dtype)
    return model, config


def _run(model, config, dtype, monkeypatch, fast: bool) -> tuple[dict[str, torch.Tensor], int]:
    calls = []
    real = cpu_decode_layer.decode_layer

    def counted(*args):
        out = real(*args) if fast else None
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_decode_layer, "decode_layer", counted)
    g = torch.Generator().manual_seed(1)
    prompt_a = torch.randint(3, 256, (37,), generator=g).tolist()
    prompt_b = torch.randint(3, 256, (21,), generator=g).tolist()
    runner = MiniRunner(copy.deepcopy(model), config, block_size=16, num_blocks=12, dtype=dtype, seed=7)
    outs = run_mixed_schedule(runner, prompt_a, prompt_b, split=20, decode_steps=6)
    return outs, sum(calls)


@pytest.mark.parametrize("dtype,quantization", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.bfloat16, "int8"), (torch.bfloat16, "int4"),
                                                (torch.float32, "int4")])
def test_fast_path_is_bit_identical_to_the_modules(dtype, quantization, monkeypatch):
    """Also: int4 / int8 layers with bf16 activations run as one C++ call (llama_decode_layer)."""
    model, config = _tiny_model(dtype, quantization)
    ops, whole_layer = cpu_ops(), []
    real_layer = ops.llama_decode_layer
    monkeypatch.setattr(ops, "llama_decode_layer", lambda *a: whole_layer.append(1) or real_layer(*a))
    fast, n_fast = _run(model, config, dtype, monkeypatch, fast=True)
    slow, n_slow = _run(model, config, dtype, monkeypatch, fast=False)
    assert n_slow == 0
    # the 6 pure-decode steps x 2 layers ran the fast path; the two prefill steps did not ask
    assert n_fast == 6 * config.num_hidden_layers
    assert len(whole_layer) == (n_fast if quantization and dtype == torch.bfloat16 else 0)
    for rid in ("A", "B"):
        assert torch.equal(fast[rid], slow[rid]), f"{rid}: fast path differs from the modules"


@pytest.mark.parametrize("overrides", [{"attention_bias": True, "model_type": "qwen2",
                                        "architectures": ["Qwen2ForCausalLM"]},
                                       {"qk_norm": True, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                                        "head_dim": 32}])
def test_layers_the_fast_path_does_not_run_fall_back(overrides, monkeypatch):
    """Projection bias (Qwen2) and q/k norm (Qwen3): decode_layer declines before touching anything."""
    model, config = _tiny_model(torch.float32, None, **overrides)
    outs, n_fast = _run(model, config, torch.float32, monkeypatch, fast=True)
    assert n_fast == 0
    assert all(torch.isfinite(v).all() for v in outs.values())
