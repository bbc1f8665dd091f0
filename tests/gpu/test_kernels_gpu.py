"""Triton kernels at real shapes on the GPU vs their torch twins (skipped without CUDA).

Shapes: Llama-3.1-8B attention (32 query heads / 8 KV heads / head_dim 128, hidden 4096,
intermediate 14336) and SmolLM2-135M (9 / 3 / 64, hidden 576, intermediate 1536); bf16 like the
engine on GPU. Attention is compared with the torch reference run in fp32 on the same bf16
inputs (rel. Frobenius error; bf16 output rounding alone is ~3e-3); the elementwise kernels
mirror their twin's rounding steps: nearly all elements equal, the rest within two bf16 ulps.
Also: a decode launch captured in a CUDA graph (grid sized for max_model_len) replays to the same
bits as eager launches, and a tiny model's forward through the dispatching layers on CUDA matches
the same model on the CPU torch path.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():  # before importing triton: keeps CPU runs free of it
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from engine_core.kernels.fused_add_rmsnorm import fused_add_rms_norm, rms_norm
from engine_core.kernels.paged_attention import causal_attention, paged_attention
from engine_core.kernels.paged_decode_attention import paged_decode_attention
from engine_core.kernels.reshape_and_cache import reshape_and_cache
from engine_core.kernels.rotary import rotary_and_cache, rotary_embedding
from engine_core.kernels.silu_and_mul import silu_and_mul
from engine_core.layers.activation import silu_and_mul_ref
from engine_core.layers.attention import (
    causal_attention_ref,
    paged_attention_ref,
    write_kv_cache_ref,
)
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.layers.layernorm import rms_norm_ref
from engine_core.layers.rotary import apply_rotary_ref, compute_cos_sin_cache

DEV = torch.device("cuda")
SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
BF16 = torch.bfloat16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make_step(query_lens, seq_lens, hkv, d, block_size=16, seed=0, pad_rows=0):
    """Random, shuffled block tables; cache (bf16, unused slots NaN, null block 0 zero) holding each
    request's prefix; this step's K/V not yet written. Everything on the GPU."""
    g = torch.Generator().manual_seed(seed)
    B = len(query_lens)
    nblk = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(nblk) + 7
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    bt = torch.zeros(B, max(nblk) + 2, dtype=torch.int32)
    for i, n in enumerate(nblk):
        bt[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    cache = torch.full((2, num_blocks, block_size, hkv, d), float("nan"), dtype=BF16, device=DEV)
    cache[:, 0] = 0
    flat = cache.view(2, -1, hkv, d)
    slots = []
    for i, (L, S) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(S)
        slot = (bt[i, pos // block_size].long() * block_size + pos % block_size).to(DEV)
        flat[:, slot[:S - L]] = torch.randn(2, S - L, hkv, d, device=DEV).to(BF16)
        slots.append(slot[S - L:])
    slots.append(torch.full((pad_rows,), -1, dtype=torch.long, device=DEV))
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    nd = 0
    while nd < B and query_lens[nd] == 1:
        nd += 1
    md = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=qsl.to(DEV), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
        block_tables=bt.to(DEV), block_size=block_size, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens), num_decodes=nd)
    T = sum(query_lens) + pad_rows
    return md, cache, torch.randn(T, hkv, d, device=DEV).to(BF16), torch.randn(T, hkv, d, device=DEV).to(BF16)


@pytest.mark.parametrize("model", list(SHAPES))
def test_reshape_and_cache_real(model):
    _, hkv, d = SHAPES[model]
    md, cache, k, v = make_step([1] * 8 + [300], [17, 256, 257, 1000, 4096, 1, 33, 2049, 700], hkv, d, pad_rows=5)
    ref = cache.clone()
    write_kv_cache_ref(k, v, ref, md.slot_mapping)
    reshape_and_cache(k, v, cache, md.slot_mapping)
    assert torch.equal(cache[:, 1:].nan_to_num(7.0), ref[:, 1:].nan_to_num(7.0))
    assert torch.equal(cache[:, 0], torch.zeros_like(cache[:, 0]))  # padding rows skipped


DECODE_LENS = [1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 511, 1000, 1024, 2049, 4095, 4096, 4097, 6000,
               8191, 12345, 31, 700, 3, 128]


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_real(model, block_size):
    hq, hkv, d = SHAPES[model]
    md, cache, k, v = make_step([1] * len(DECODE_LENS), DECODE_LENS, hkv, d, block_size=block_size, seed=block_size)
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    q = torch.randn(len(DECODE_LENS), hq, d, device=DEV).to(BF16)
    scale = d ** -0.5
    ref = paged_attention_ref(q.float(), cache.float(), md, scale)
    out = paged_decode_attention(q, cache[0], cache[1], md.block_tables, md.seq_lens, scale, md.max_seq_len)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)


def test_decode_cuda_graph_replay_is_bit_identical():
    """Capture one decode launch on static buffers with the grid sized for max_model_len, replay
    it for a new batch (new lengths, block tables, queries): same bits as an eager launch."""
    hq, hkv, d = SHAPES["llama8b"]
    B, max_model_len, bs = 8, 8192, 16
    md, cache, k, v = make_step([1] * B, [5, 300, 1024, 4100, 17, 2000, 8000, 64], hkv, d, seed=3)
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    width = max_model_len // bs
    s_q = torch.zeros(B, hq, d, dtype=BF16, device=DEV)
    s_lens = torch.ones(B, dtype=torch.int32, device=DEV)
    s_bt = torch.zeros(B, width, dtype=torch.int32, device=DEV)
    s_out = torch.empty(B, hq, d, dtype=BF16, device=DEV)

    def launch():
        paged_decode_attention(s_q, cache[0], cache[1], s_bt, s_lens, d ** -0.5, max_model_len, out=s_out)

    launch()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for seed in range(2):
        g = torch.Generator(device=DEV).manual_seed(seed)
        perm = torch.randperm(B, device=DEV, generator=g)  # a different batch each replay
        q = torch.randn(B, hq, d, device=DEV, generator=g).to(BF16)
        s_q.copy_(q)
        s_lens.copy_(md.seq_lens[perm])
        s_bt.zero_()
        s_bt[:, :md.block_tables.shape[1]].copy_(md.block_tables[perm])
        graph.replay()
        eager = paged_decode_attention(q, cache[0], cache[1], md.block_tables[perm], md.seq_lens[perm], d ** -0.5,
                                       int(md.seq_lens.max()))
        torch.cuda.synchronize()
        assert torch.equal(s_out, eager)


@pytest.mark.parametrize("model", list(SHAPES))
def test_mixed_step_real(model):
    """decodes + chunked prefills with cached prefixes + a fresh prompt + padding rows, through the
    same dispatcher and KV write the Attention layer uses."""
    hq, hkv, d = SHAPES[model]
    query_lens = [1, 1, 1, 1, 300, 77, 512, 129]
    seq_lens = [100, 2000, 17, 4097, 300, 1077, 1536, 129 + 640]
    md, cache, k, v = make_step(query_lens, seq_lens, hkv, d, seed=5, pad_rows=3)
    q = torch.randn(k.shape[0], hq, d, device=DEV).to(BF16)
    ref_cache = cache.clone()
    write_kv_cache_ref(k, v, ref_cache, md.slot_mapping)
    ref = paged_attention_ref(q.float(), ref_cache.float(), md, d ** -0.5)
    reshape_and_cache(k, v, cache, md.slot_mapping)
    out = paged_attention(q, cache, md, d ** -0.5)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)


@pytest.mark.parametrize("model", list(SHAPES))
def test_varlen_causal_real(model):
    hq, hkv, d = SHAPES[model]
    md, _, k, v = make_step([700, 1, 64, 1500], [700, 1, 64, 1500], hkv, d)
    md.num_decodes = 0
    q = torch.randn(k.shape[0], hq, d, device=DEV).to(BF16)
    ref = causal_attention_ref(q.float(), k.float(), v.float(), md, d ** -0.5)
    out = causal_attention(q, k, v, md, d ** -0.5)
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)


def assert_bf16_rounding_close(out, ref):
    """bf16 results that mirror the twin's rounding steps: (nearly always) equal, else within two
    bf16 ulps. The fp32 arithmetic before a rounding may differ in its last bits (FMA contraction,
    reduction order), which can flip that rounding; rms_norm and silu_and_mul round twice (the
    intermediate, then the product), so one flipped intermediate moves the output by up to ~2 ulp
    (seen: 1.25 for rms_norm on an H100). Where terms cancel (rotary: x1 cos - x2 sin ~ 0) the fp32
    error, ~2^-22 of the operands' magnitude, can exceed the result's own ulp: a small absolute slack."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    diff = (out.float() - ref.float()).abs()
    ulp = torch.finfo(BF16).eps * torch.maximum(out.float().abs(), ref.float().abs())
    slack = 2.0 ** -20 * float(ref.float().abs().max())
    assert bool((diff <= 2 * ulp + slack).all()), float((diff / (ulp + slack)).max())
    assert float((out == ref).float().mean()) > 0.98


@pytest.mark.parametrize("hidden", [4096, 576])
def test_rms_norm_real(hidden):
    x = torch.randn(257, hidden, device=DEV).to(BF16)
    res = torch.randn(257, hidden, device=DEV).to(BF16)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(BF16)
    assert_bf16_rounding_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    ref_out, ref_res = rms_norm_ref(x, w, 1e-5, res)
    out, new_res = fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    assert torch.equal(new_res, ref_res)
    assert_bf16_rounding_close(out, ref_out)


@pytest.mark.parametrize("model", list(SHAPES))
def test_rotary_real(model):
    hq, hkv, d = SHAPES[model]
    cache = compute_cos_sin_cache(d, 16384, 500000.0, LLAMA3_ROPE).to(DEV)
    T = 333
    positions = torch.randint(0, 16384, (T,), device=DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEV).to(BF16)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    ref_q = apply_rotary_ref(positions, q, cache, d)
    ref_k = apply_rotary_ref(positions, k, cache, d)
    rotary_embedding(positions, q, k, cache, d)
    assert_bf16_rounding_close(q, ref_q)
    assert_bf16_rounding_close(k, ref_k)


@pytest.mark.parametrize("inter", [14336, 1536])
def test_silu_and_mul_real(inter):
    x = (2 * torch.randn(129, 2 * inter, device=DEV)).to(BF16)
    assert_bf16_rounding_close(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_cuda_kernels_match_cpu_reference(arch):
    """The dispatching layers end to end (in-place fused norms and rotary, KV write, decode and
    chunked-prefill attention): a tiny model in fp32 on CUDA vs the same weights on the CPU torch
    path, through a mixed schedule (chunked prefill, decodes batched with a chunk)."""
    import copy

    from tests.unit.test_models import (
        MiniRunner,
        make_hf_tiny,
        make_ours_from_hf,
        run_mixed_schedule,
    )

    hf = make_hf_tiny(arch)
    cpu_model, config = make_ours_from_hf(arch, hf)
    gpu_model = copy.deepcopy(cpu_model).to(DEV)
    picks = lambda row, rid, step: (37 * step + (5 if rid == "A" else 11)) % config.vocab_size
    a = list(range(3, 43))
    b = list(range(50, 71))
    ref = run_mixed_schedule(MiniRunner(cpu_model, config, 16, 64), a, b, 17, 6, picks)
    got = run_mixed_schedule(MiniRunner(gpu_model, config, 16, 64, device=DEV), a, b, 17, 6, picks)
    for rid in ("A", "B"):
        err = (got[rid].cpu() - ref[rid]).abs().max().item()
        assert err < 2e-3, (rid, err)


# ----------------------------------------------------------------------------- --kv-cache-dtype fp8

def _fp8_cache(cache: torch.Tensor) -> torch.Tensor:
    """A bf16 step cache (NaN = unused) as the fp8 cache holding the same prefix."""
    return cache.nan_to_num(0.0).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("model", list(SHAPES))
def test_reshape_and_cache_fp8(model):
    _, hkv, d = SHAPES[model]
    md, cache, k, v = make_step([1] * 8 + [300], [17, 256, 257, 1000, 4096, 1, 33, 2049, 700], hkv, d, pad_rows=5)
    k[0, 0, 0], v[1, 0, 1] = 1e4, -1e4  # saturate at +-448, never NaN
    cache8 = _fp8_cache(cache)
    ref = cache8.clone()
    write_kv_cache_ref(k, v, ref, md.slot_mapping)
    reshape_and_cache(k, v, cache8, md.slot_mapping)
    assert not cache8.float().isnan().any()
    assert torch.equal(cache8[:, 1:].view(torch.uint8), ref[:, 1:].view(torch.uint8))


@pytest.mark.parametrize("model", list(SHAPES))
def test_paged_attention_over_fp8_cache(model):
    """Decodes and a chunked prefill read the fp8 cache: the kernels widen it like the torch path."""
    hq, hkv, d = SHAPES[model]
    md, cache, k, v = make_step([1] * 6 + [40, 200], [17, 256, 257, 1000, 3, 4097, 100, 700], hkv, d)
    cache8 = _fp8_cache(cache)
    write_kv_cache_ref(k, v, cache8, md.slot_mapping)
    q = torch.randn(k.shape[0], hq, d, device=DEV).to(BF16)
    scale = d ** -0.5
    ref = paged_attention_ref(q.float(), cache8.float(), md, scale)  # fp8 values, fp32 math
    out = paged_attention(q, cache8, md, scale)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)


def test_engine_with_fp8_kv_cache_and_cuda_graphs():
    from engine_core.llm import LLM
    from engine_core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[100 + i for i in range(40)], [700 + i for i in range(9)]]
    blocks = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model="dummy:benchmarks/configs/smollm2-135m-instruct.json", dtype="bfloat16",
                  max_model_len=512, max_num_seqs=4, kv_cache_dtype=kv, kv_cache_memory_gb=0.25)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
        assert llm.engine.core.executor.runner.graph_runner is not None
        blocks[kv] = llm.engine.core.executor.describe().num_kv_blocks
        del llm
    assert blocks["fp8"] == pytest.approx(2 * blocks["auto"], abs=2)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("T", [1, 7, 64])
def test_rotary_and_cache_matches_rotary_then_reshape_and_cache(cache_dtype, T):
    """Llama-3.1-8B heads (32 q / 8 kv x 128): the fused rope + KV write equals the two kernels it
    replaces, bit for bit, for a bf16 and an fp8 cache, with a padding row (slot -1)."""
    torch.manual_seed(T)
    hq, hk, d, bs, nblk = 32, 8, 128, 16, 16
    cos_sin = compute_cos_sin_cache(d, 4096, 500000.0).cuda()
    positions = torch.randint(0, 4096, (T,), device="cuda")
    slots = torch.randperm(nblk * bs, device="cuda")[:T]
    slots[-1] = -1
    qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16) * 4
    cache = torch.zeros(2, nblk, bs, hk, d, device="cuda", dtype=cache_dtype)

    def split(t):
        q, k, v = t.split([hq * d, hk * d, hk * d], dim=-1)
        return q, k.view(T, hk, d), v.view(T, hk, d)

    ref_qkv, ref_cache = qkv.clone(), cache.clone()
    q, k, v = split(ref_qkv)
    rotary_embedding(positions, q, k, cos_sin, d)
    reshape_and_cache(k, v, ref_cache, slots)
    got_qkv, got_cache = qkv.clone(), cache.clone()
    q, k, v = split(got_qkv)
    rotary_and_cache(positions, q, k, v, cos_sin, d, got_cache, slots)
    assert torch.equal(got_qkv[:, :hq * d], ref_qkv[:, :hq * d])
    assert torch.equal(got_cache.view(torch.uint8), ref_cache.view(torch.uint8))
