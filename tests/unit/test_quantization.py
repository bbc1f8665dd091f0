"""Weight-only int8/int4 on CPU: perplexity on a committed text within 1 % / 5 % of the fp32 model,
smaller resident weights, packed and dequantized paths agreeing, clear errors."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from engine_core.cpu_resources import cpu_capabilities
from engine_core.kernels.cpu_ops import cpu_ops, cpu_ops_status
from engine_core.layers.linear import Linear
from engine_core.layers.quantization import (
    Int4Linear,
    Int8Linear,
    model_resident_bytes,
    quantize_int4_groups,
    quantize_model,
)
from engine_core.loader import load_model
from engine_core.loader.model_source import resolve_model
from engine_core.perplexity import perplexity
from engine_core.tokenizer import load_tokenizer

TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "perplexity_text.txt")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fp32_model_and_ids(gguf_path):
    source = resolve_model(gguf_path)
    with open(TEXT) as f:
        ids = load_tokenizer(source.path).encode(f.read())
    return load_model(source, "float32", "cpu"), ids


@pytest.fixture(scope="module")
def fp32_ppl(fp32_model_and_ids):
    model, ids = fp32_model_and_ids
    return perplexity(model, ids)


def test_bf16_loaded_model_has_packed_linears_and_keeps_quality(gguf_path, fp32_model_and_ids, fp32_ppl):
    """A CPU bf16 model from the loader runs its linear layers on oneDNN-prepacked weights
    (layers/cpu_packed_linear.py), LM head included; same quality bound as the plain bf16 model."""
    from engine_core.layers.cpu_packed_linear import PackedLinear, _ops_available

    if not _ops_available() or not cpu_capabilities().native_bf16:
        pytest.skip("no oneDNN weight packing, or a CPU that emulates bf16")
    model = load_model(resolve_model(gguf_path), "bfloat16", "cpu")
    assert isinstance(model.lm_head, PackedLinear)
    assert not any(isinstance(m, Linear) for m in model.modules())
    _, ids = fp32_model_and_ids
    ppl = perplexity(model, ids)
    assert ppl / fp32_ppl - 1 <= 0.01, f"packed bf16: perplexity {ppl:.3f} vs fp32 {fp32_ppl:.3f}"


def test_bf16_perplexity_within_1_percent_where_native(fp32_model_and_ids, fp32_ppl):
    """bf16 is the faster CPU dtype where AMX / AVX512-BF16 run it in hardware; its cost in quality."""
    if not cpu_capabilities().native_bf16:
        pytest.skip("this CPU emulates bf16 (no AMX / AVX512-BF16): not a configuration we recommend")
    model, ids = fp32_model_and_ids
    ppl = perplexity(copy.deepcopy(model).to(torch.bfloat16), ids)
    assert ppl / fp32_ppl - 1 <= 0.01, f"bf16: perplexity {ppl:.3f} vs fp32 {fp32_ppl:.3f}"


@pytest.mark.parametrize("method,bound", [("int8", 0.01), ("int4", 0.05)])
def test_perplexity_within_bound_of_fp32(fp32_model_and_ids, fp32_ppl, method, bound):
    model, ids = fp32_model_and_ids
    assert len(ids) > 500  # a few KB of text, not a toy sequence
    quant = quantize_model(copy.deepcopy(model), method, CPU, torch.float32)
    ppl = perplexity(quant, ids)
    assert 1.0 < fp32_ppl < 100.0  # the model reads English: a sane baseline
    assert ppl / fp32_ppl - 1 <= bound, f"{method}: perplexity {ppl:.3f} vs fp32 {fp32_ppl:.3f}"
    # Resident weights shrink: int8 to about 1/4 of fp32, int4 below that.
    ratio = model_resident_bytes(quant) / model_resident_bytes(model)
    assert ratio < (0.35 if method == "int8" else 0.25), ratio
    assert not any(isinstance(m, Linear) for m in quant.modules())


@pytest.mark.parametrize("method,bound", [("int8", 0.01), ("int4", 0.05)])
def test_perplexity_through_the_decode_kernels(fp32_model_and_ids, fp32_ppl, method, bound, monkeypatch):
    """The decode path's numerics on the real model: every row through the C++ GEMMs
    (kernels/cpu_quant_gemv.cpp; the perplexity run is one prefill, which would otherwise take the
    dense path)."""
    if cpu_ops() is None:
        pytest.skip(cpu_ops_status())
    model, ids = fp32_model_and_ids
    for cls in (Int4Linear, Int8Linear):
        monkeypatch.setattr(cls, "dense_min_rows", 1 << 30)
    quant = quantize_model(copy.deepcopy(model), method, torch.device("cpu"), torch.float32)
    assert all(m.use_kernel for m in quant.modules() if isinstance(m, (Int4Linear, Int8Linear)))
    ppl = perplexity(quant, ids)
    assert ppl / fp32_ppl - 1 <= bound, f"{method} through the kernels: {ppl:.3f} vs fp32 {fp32_ppl:.3f}"


def test_int4_keeps_q4_1_codes_exactly():
    """A weight on a Q4_1 grid (q * scale + min per 32 values) re-quantizes to the same codes."""
    g = torch.Generator().manual_seed(0)
    n, k = 64, 128
    codes = torch.randint(0, 16, (n, k), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # llama.cpp's min/max: both ends of the range in use
    scale = torch.rand(n, k // 32, generator=g) * 0.1 + 0.01
    lo = -torch.rand(n, k // 32, generator=g)
    w = (codes.view(n, k // 32, 32) * scale[..., None] + lo[..., None]).view(n, k)
    q, s, m = quantize_int4_groups(w)
    assert torch.equal(q, codes.to(torch.int32))
    torch.testing.assert_close(s, scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, lo, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_packed_kernel_and_dense_path_agree(cls):
    """Few rows go through the packed kernel, many through the dequantized GEMM: same numbers."""
    torch.manual_seed(0)
    lin = Linear(256, 128, bias=True)
    lin.weight.data.normal_()
    lin.bias.data.normal_()
    layer = cls(lin)
    x = torch.randn(80, 256)
    many = layer(x)  # >= dense_min_rows: dense path
    few = torch.cat([layer(x[i:i + 4]) for i in range(0, 80, 4)])  # packed kernel
    torch.testing.assert_close(few, many, rtol=0.02, atol=0.25)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    rel = (many - ref).norm() / ref.norm()
    assert rel < (0.02 if cls is Int8Linear else 0.12), rel


def test_unsupported_combinations_are_clear_errors():
    lin = torch.nn.Sequential(Linear(32, 64))
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        quantize_model(lin, "fp8", CPU, torch.float32)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(lin, "int2", CPU, torch.float32)
    with pytest.raises(ValueError, match="CPU weight-only path"):
        quantize_model(lin, "int8", torch.device("cuda"), torch.float32)


# Measured on SmolLM2-135M (fp32 26.45): weight-only +1.19 %, w8a8 +3.18 %. The goal is
# 1 %; a 135M model is far more sensitive to 3-bit mantissas than the 8B models fp8 is meant for,
# and per-group scales (64/128 along K) did not help here (+0.96 %..+2.0 %, noise-level). The
# bounds catch regressions of the numerics (a wrong scale or rounding costs far more).
@pytest.mark.parametrize("path,bound", [("w8a8", 0.04), ("weight_only", 0.015)])
def test_fp8_perplexity_near_fp32(fp32_model_and_ids, fp32_ppl, monkeypatch, path, bound):
    """fp8's numerics on real weights, on CPU through the layer's torch twins (fp8 itself runs on
    Hopper: the kernels are checked against these twins in tests/gpu and under the interpreter).
    w8a8 is the prefill path (per-token activation scales + scaled GEMM), weight_only the decode
    path (e4m3 weights widened, activations unrounded)."""
    from engine_core.layers import fp8_linear
    model, ids = fp32_model_and_ids
    monkeypatch.setattr(fp8_linear, "check_fp8_supported", lambda device: None)
    monkeypatch.setattr(fp8_linear, "WEIGHT_ONLY_MAX_ROWS", 0 if path == "w8a8" else 1 << 30)
    quant = quantize_model(copy.deepcopy(model), "fp8", CPU, torch.float32)
    assert any(isinstance(m, fp8_linear.Fp8Linear) for m in quant.modules())
    ppl = perplexity(quant, ids)
    assert ppl / fp32_ppl - 1 <= bound, f"fp8 {path}: perplexity {ppl:.3f} vs fp32 {fp32_ppl:.3f}"


@pytest.fixture(scope="module")
def gptq_fp8_checkpoint(gguf_path, tmp_path_factory):
    """The embedded model GPTQ-quantized to fp8 by the offline tool, calibrated on its default
    calibration text (engine_core/data/calibration_text.txt, not the test text)."""
    from engine_core.tools.quantize_fp8 import quantize_fp8
    out = str(tmp_path_factory.mktemp("smollm2-fp8"))
    quantize_fp8(gguf_path, out, dtype="float32")
    return out


# Measured (docs/fp8.md, Quality): weight-only +0.69 % (round-to-nearest +1.30 %); w8a8 +0.99 %
# (round-to-nearest +1.82 %), which moves by ~1 % with tiny numeric changes, so it is not bounded here.
def test_gptq_fp8_checkpoint_perplexity_within_1_percent(gptq_fp8_checkpoint, fp32_model_and_ids, fp32_ppl,
                                                         monkeypatch):
    """The offline GPTQ checkpoint served with --quantization fp8 (e4m3 codes and scales as stored),
    on the weight-only (decode) path through the same torch twin as test_fp8_perplexity_near_fp32."""
    from engine_core.layers import fp8_linear
    _, ids = fp32_model_and_ids
    monkeypatch.setattr(fp8_linear, "check_fp8_supported", lambda device: None)
    monkeypatch.setattr(fp8_linear, "WEIGHT_ONLY_MAX_ROWS", 1 << 30)
    quant = load_model(gptq_fp8_checkpoint, "float32", "cpu", quantization="fp8")
    assert sum(isinstance(m, fp8_linear.Fp8Linear) for m in quant.modules()) == 4 * 30
    ppl = perplexity(quant, ids)
    assert ppl / fp32_ppl - 1 <= 0.01, f"GPTQ fp8 weight-only: perplexity {ppl:.3f} vs fp32 {fp32_ppl:.3f}"
