"""The C++ CPU decode kernels (engine_core/kernels/cpu_decode_ops.cpp) against their torch twins.

The kernels are built by `make setup` (engine_core.kernels.cpu_ops); where no C++ toolchain exists
they are off and these tests skip (the layers then run the twins, which the rest of the suite covers).
"""
from __future__ import annotations

import pytest
import torch

from engine_core.kernels.cpu_ops import cpu_ops, cpu_ops_status
from engine_core.layers.activation import silu_and_mul_ref
from engine_core.layers.attention import (
    paged_attention_ref,
    rows_attention_cpu_kernel,
    rows_attention_sdpa,
    write_kv_cache_ref,
)
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.layers.layernorm import rms_norm_ref
from engine_core.layers.rotary import apply_rotary_ref, compute_cos_sin_cache

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason=cpu_ops_status())

DTYPES = [torch.float32, torch.bfloat16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 64), (70, 1000)])
def test_rms_norm_matches_twin(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    ref = rms_norm_ref(x, w, 1e-5)
    assert _rel(ops.rms_norm(x, w, 1e-5), ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    ref_out, ref_res = rms_norm_ref(x.clone(), w, 1e-5, res.clone())
    xi, ri = x.clone(), res.clone()
    ops.fused_add_rms_norm_(xi, ri, w, 1e-5)
    assert torch.equal(ri, ref_res)  # the sum is rounded once, as the twin rounds it
    assert _rel(xi, ref_out) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_and_cache_write_bit_identical(dtype, rotary_dim):
    T, hq, hkv, d, bs, nblk = 7, 9, 3, 64, 4, 6
    g = torch.Generator().manual_seed(rotary_dim)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    positions = torch.tensor([0, 1, 2, 9, 30, 31, 100])
    cos_sin = compute_cos_sin_cache(rotary_dim, 128, 10000.0, None)
    slots = torch.tensor([4, 5, 6, 7, 13, 22, 9])
    ref_q = apply_rotary_ref(positions, q, cos_sin, d)
    ref_k = apply_rotary_ref(positions, k, cos_sin, d)
    ref_cache = torch.zeros(2, nblk, bs, hkv, d, dtype=dtype)
    write_kv_cache_ref(ref_k.reshape(T, hkv, d), v.reshape(T, hkv, d), ref_cache, slots)
    cache = torch.zeros_like(ref_cache)
    ops.rotary_qk_cache_(q, k, v, positions, cos_sin, d, cache, slots)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(cache, ref_cache)


def test_rotary_rejects_a_slot_outside_the_cache():
    q, k, v = torch.zeros(1, 64), torch.zeros(1, 64), torch.zeros(1, 64)
    cache = torch.zeros(2, 2, 4, 1, 64)
    cos_sin = compute_cos_sin_cache(64, 16, 10000.0, None)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        ops.rotary_qk_cache_(q, k, v, torch.tensor([0]), cos_sin, 64, cache, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="outside the rotary cache"):
        ops.rotary_qk_cache_(q, k, v, torch.tensor([16]), cos_sin, 64, cache, torch.tensor([0]))


def _decode_md(lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator) -> AttentionMetadata:
    """Decode rows with shuffled, disjoint block tables (block 0 stays the null block)."""
    need = [-(-n // block_size) for n in lens]
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1)[:sum(need)]
    width = max(need) + 1
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    start = 0
    for i, n in enumerate(need):
        bt[i, :n] = ids[start:start + n]
        start += n
    return AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=bt, block_size=block_size,
        max_query_len=1, max_seq_len=max(lens), query_lens_cpu=[1] * len(lens), seq_lens_cpu=list(lens),
        num_decodes=len(lens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 2, 128), (4, 4, 64), (18, 2, 64), (6, 2, 48)])
def test_paged_decode_attention_matches_sdpa(dtype, hq, hkv, d):
    """Rows of many lengths (1, around the 16-token chunks and the block edges) over scattered
    blocks, against the SDPA twin: covers the AVX512-BF16 path (bf16, D 64/128, up to 8 query heads
    per KV head), the portable path for everything else (fp32, 9 query heads per KV head, D 48)."""
    gen = torch.Generator().manual_seed(hq * 100 + d)
    bs, nblk = 16, 64
    lens = [1, 2, 15, 16, 17, 31, 33, 100, 129]
    cache = torch.randn(2, nblk, bs, hkv, d, generator=gen).to(dtype)
    md = _decode_md(lens, bs, nblk, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    ref = rows_attention_sdpa(q, cache, md, len(lens), d ** -0.5)
    out = rows_attention_cpu_kernel(q, cache, md, len(lens), d ** -0.5)
    assert out.dtype == dtype and out.shape == ref.shape
    # bf16: probabilities are rounded to bf16 for p.v (as torch's bf16 flash attention rounds them)
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
    for i in range(len(lens)):  # row by row: no row may be off even if the total is close
        assert _rel(out[i], ref[i]) < (1e-5 if dtype == torch.float32 else 3e-2), f"row {i} (len {lens[i]})"


def test_paged_attention_rows_and_prefill_mixed():
    """A step of decodes, a short speculative-verification query and a prefill chunk: the kernel
    takes the row-batched requests, the prefill keeps the causal GEMMs."""
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d, bs, nblk = 6, 2, 64, 16, 32
    cache = torch.randn(2, nblk, bs, hkv, d, generator=gen)
    qlens, slens = [1, 1, 3, 40], [20, 33, 50, 70]
    bt = torch.zeros(4, 6, dtype=torch.int32)
    ids = torch.randperm(nblk - 1, generator=gen) + 1
    for i, s in enumerate(slens):
        n = -(-s // bs)
        bt[i, :n] = ids[6 * i:6 * i + n]
    T = sum(qlens)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(T, dtype=torch.long),
        query_start_loc=torch.tensor([0, 1, 2, 5, 45], dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), block_tables=bt, block_size=bs, max_query_len=40,
        max_seq_len=70, query_lens_cpu=qlens, seq_lens_cpu=slens, num_decodes=2)
    q = torch.randn(T, hq, d, generator=gen)
    ref = paged_attention_ref(q, cache, md, 0.125)
    out = paged_attention_ref(q, cache, md, 0.125, row_attention=rows_attention_cpu_kernel)
    assert _rel(out, ref) < 1e-5


def test_paged_decode_attention_rejects_bad_tables():
    cache = torch.zeros(2, 4, 16, 1, 64)
    q = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        ops.paged_decode_attention(q, cache, torch.tensor([[7]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                                   1.0)
    with pytest.raises(RuntimeError, match="outside its block table"):
        ops.paged_decode_attention(q, cache, torch.tensor([[1]], dtype=torch.int32),
                                   torch.tensor([17], dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_silu_and_mul_matches_twin(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 2 * 1536, generator=g) * 6).to(dtype)
    x[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0])  # saturated and underflowing exponentials
    out = ops.silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert torch.isfinite(out).all()
    # bf16: at most one rounding step apart (a polynomial exp instead of Sleef's)
    assert _rel(out, ref) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_layers_fall_back_when_the_kernels_are_off(monkeypatch):
    """PAGEDSERVE_CPU_KERNELS=0 (or no compiler): the layers run the torch twins."""
    from engine_core.kernels import cpu_ops as mod
    from engine_core.layers.activation import SiluAndMul
    from engine_core.layers.layernorm import RMSNorm

    monkeypatch.setattr(mod, "cpu_ops", lambda: None)
    x = torch.randn(3, 128)
    assert torch.equal(SiluAndMul()(x), silu_and_mul_ref(x))
    norm = RMSNorm(64)
    y = torch.randn(2, 64)
    assert torch.equal(norm(y), rms_norm_ref(y, norm.weight, norm.eps))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 130])
def test_packed_linear_matches_f_linear(bias, rows):
    """oneDNN-prepacked bf16 weights (layers/cpu_packed_linear.py) give F.linear's outputs."""
    from engine_core.layers.cpu_packed_linear import PackedLinear, _ops_available
    from engine_core.layers.linear import Linear

    if not _ops_available():
        pytest.skip("this torch has no oneDNN weight packing")
    g = torch.Generator().manual_seed(rows)
    lin = Linear(96, 192, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 96, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(192, generator=g))
    lin = lin.to(torch.bfloat16)
    packed = PackedLinear(lin)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    out = packed(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-3
    assert packed(x.view(1, rows, 96)).shape == (1, rows, 192)
    assert packed.packed_bytes == 192 * 96 * 2


def test_pack_cpu_linears_swaps_bf16_layers_only():
    from engine_core.layers.cpu_packed_linear import (
        PackedLinear,
        _ops_available,
        pack_cpu_linears,
    )
    from engine_core.layers.quantization import model_resident_bytes
    from tests.unit.test_cpu_decode_layer import _tiny_model

    if not _ops_available():
        pytest.skip("this torch has no oneDNN weight packing")
    fp32, _ = _tiny_model(torch.float32, None)
    assert pack_cpu_linears(fp32) == 0
    bf16, config = _tiny_model(torch.bfloat16, None)
    before = model_resident_bytes(bf16)
    n = pack_cpu_linears(bf16)
    assert n == 4 * config.num_hidden_layers + 1  # qkv, o, gate_up, down per layer + the LM head
    assert all(isinstance(m, PackedLinear) for m in (bf16.lm_head, bf16.model.layers[0].mlp.down_proj))
    assert model_resident_bytes(bf16) == before  # the plain weights are gone, their packed copies counted
