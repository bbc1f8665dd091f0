"""The quantized-weight GEMMs of the CPU decode step (engine_core/kernels/cpu_quant_gemv.cpp)
against their torch twins (layers/quantization.py), on this CPU's path and on the AVX2 and portable
paths other machines get (built with -march=x86-64-v3 / x86-64-v2), plus the layers' use of them,
layouts and bad arguments. Perplexity through the kernels: test_quantization.py."""
from __future__ import annotations

import os

import pytest
import torch

from engine_core.cpu_resources import cpu_capabilities
from engine_core.kernels.cpu_ops import build_for_march, cpu_ops, cpu_ops_status
from engine_core.layers.linear import Linear
from engine_core.layers.quantization import (
    Int4Linear,
    Int8Linear,
    int4_dequantize_ref,
    int4_linear_ref,
    int8_linear_ref,
    pack_int4_blocks,
    quantize_activations_int8_ref,
    unpack_int4_blocks,
)

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason=cpu_ops_status())

# K: one partial segment (3 chunks), a full segment + 1 chunk (SmolLM2's hidden), two + 1.
SHAPES = [(68, 192), (64, 576), (132, 1088)]
ROWS = [1, 2, 3, 5]


def _int4_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    lo = (-torch.rand(n, k // 32, generator=g) * 0.1).half()
    return codes, scale, lo


def _acts(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, :32] = 0  # an all-zero group: scale 0, no NaN
    if m > 1:
        x[1, 40] = 300.0  # an outlier inside a group
    return x.to(dtype)


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    # fp32: only summation order differs; bf16: the output's rounding
    tol = 8e-3 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@pytest.fixture(scope="module", params=["native", "x86-64-v3", "x86-64-v2"])
def kernels(request):
    """This CPU's build, the AVX2 paths and the portable loops."""
    if request.param == "native":
        return ops
    if request.param == "x86-64-v3" and not "avx2" in cpu_capabilities().flags:
        pytest.skip("this CPU has no AVX2")
    if os.uname().machine != "x86_64":
        pytest.skip("x86 levels")
    return build_for_march(request.param)


def test_each_build_runs_its_own_path(kernels):
    expected = {build_for_march("x86-64-v2"): "portable"} if kernels is not ops else {}
    if kernels is not ops and "avx2" in cpu_capabilities().flags:
        expected[build_for_march("x86-64-v3")] = "avx2"
    assert kernels.quant_dot_isa() == expected.get(kernels, kernels.quant_dot_isa())
    assert kernels.quant_dot_isa() in ("avx512-vnni", "avx2", "portable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_linear_matches_twin(kernels, n, k, dtype):
    packed = pack_int4_blocks(*_int4_weights(n, k, seed=k))
    for m in ROWS:
        x = _acts(m, k, dtype, seed=m)
        _close(kernels.int4_linear(x, packed), int4_linear_ref(x, packed), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(70, 192), (64, 576), (130, 1088)])  # n % 4 != 0: single-row tiles
def test_int8_linear_matches_twin(kernels, n, k, dtype):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    for m in ROWS:
        x = _acts(m, k, dtype, seed=m)
        _close(kernels.int8_linear(x, q, s), int8_linear_ref(x, q, s), dtype)


def test_two_digit_activations_are_15_bits():
    """v * scale reproduces x to 1/32512 of each group's absmax (one int8 digit: 1/254); a second
    digit of exactly +-128 is clamped to 127, hence one unit, not half."""
    x = torch.randn(4, 256)
    v, scale, total = quantize_activations_int8_ref(x)
    unit = x.reshape(4, -1, 32).abs().amax(-1, keepdim=True) / 127 / 256
    err = (v * scale[..., None] - x.reshape(4, -1, 32)).abs() / unit
    assert err.max() <= 1.001 and err.mean() < 0.3  # rounding to nearest: a quarter unit on average
    torch.testing.assert_close(total, x.reshape(4, -1, 32).sum(-1))


def test_int4_kernel_is_the_dequantized_weight_to_fp32_accuracy():
    codes, scale, lo = _int4_weights(64, 576, seed=1)
    packed = pack_int4_blocks(codes, scale, lo)
    w = codes.reshape(64, -1, 32) * scale.float()[..., None] + lo.float()[..., None]
    x = torch.randn(3, 576)
    ref = x.double() @ w.reshape(64, 576).double().t()
    rel = ((ops.int4_linear(x, packed).double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel  # activations at ~15 bits: weight-only accuracy


@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_dequantize_is_bit_identical_to_its_twin(kernels, n, k):
    packed = pack_int4_blocks(*_int4_weights(n, k, seed=n))
    assert torch.equal(kernels.int4_dequantize(packed), int4_dequantize_ref(packed))


def test_int4_pack_round_trips():
    codes, scale, lo = _int4_weights(8, 1088, seed=2)
    packed = pack_int4_blocks(codes, scale, lo)
    assert packed.shape == (2, 1088 * 5 // 2)
    c, s, m = unpack_int4_blocks(packed)
    assert torch.equal(c.long(), codes) and torch.equal(s, scale) and torch.equal(m, lo)


def test_bad_arguments_are_errors_not_crashes():
    packed = pack_int4_blocks(*_int4_weights(4, 128, seed=3))
    with pytest.raises(RuntimeError, match="inputs"):
        ops.int4_linear(torch.randn(1, 64), packed)
    with pytest.raises(RuntimeError, match="uint8"):
        ops.int4_linear(torch.randn(1, 128), packed.to(torch.int32))
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.int8_linear(torch.randn(1, 96), torch.zeros(4, 96, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.int8_linear(torch.randn(128, 2).t(), torch.zeros(4, 128, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match="scales"):
        ops.int8_linear(torch.randn(1, 128), torch.zeros(4, 128, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_layers_pick_the_kernel_and_fall_back_to_aten(cls):
    """Where K is a multiple of 64 the layer runs the kernel; otherwise (or forced) torch's kernel,
    with the same numbers to the activations' quantization."""
    torch.manual_seed(0)
    lin = Linear(256, 128)
    lin.weight.data.normal_()
    fast, aten = cls(lin), cls(lin, use_kernel=False)
    assert fast.use_kernel and not aten.use_kernel
    assert not cls(Linear(96, 128)).use_kernel
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), lin.weight)
    for layer in (fast, aten):
        y = layer(x).float()
        assert ((y - ref).norm() / ref.norm()).item() < (0.02 if cls is Int8Linear else 0.12)
    torch.testing.assert_close(fast(x).float(), aten(x).float(), rtol=0.05, atol=0.05 * ref.abs().max().item())
