"""Every Triton kernel against its torch twin, on CPU, under the Triton interpreter (tiny shapes).

How the interpreter is switched on (triton 3.6): `@triton.jit` decides interpreter vs compiler
when it *decorates* a function, reading TRITON_INTERPRET at that moment - and that includes
triton's own library functions (tl.cdiv, tl.max, ...), decorated when `triton` is first imported.
So the variable must be set before the process's first `import triton`; setting it later, or
re-importing only our kernel modules, leaves those library functions compiled-mode and the
interpreter fails ("Cannot call @triton.jit'd outside of the scope of a kernel").

Hence: when triton is not imported yet and there is no GPU (CI), this module sets
TRITON_INTERPRET=1 at collection time, before anything imports triton (torch, transformers and
engine_core never import it on CPU; the layers import engine_core.kernels only for CUDA tensors)
and the tests run in process. Otherwise (a GPU host, where the GPU tests already imported
triton compiled-mode, or triton imported by something else first) every test here is skipped
and `test_interpreter_suite_in_subprocess` reruns this file in a child process with the
variable set and CUDA hidden, so the interpreter suite still runs and its result still counts.

Interpreter limits (triton 3.6, CPU): tl.dot on bfloat16 operands is wrong, so attention is
checked here in float32 and float16 (bfloat16 attention: tests/gpu/test_kernels_gpu.py); and a
float32 -> bfloat16 cast truncates where the GPU rounds to nearest even, so bf16 outputs get a
one-ulp tolerance here.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

_IN_PROCESS = False
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton` (see the docstring)
    _IN_PROCESS = True
elif os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules:
    import triton.language as _tl
    from triton.runtime.interpreter import InterpretedFunction as _IF
    _IN_PROCESS = isinstance(_tl.cdiv, _IF)  # triton itself was imported in interpreter mode

import pytest

pytest.importorskip("triton")

from engine_core.layers.activation import silu_and_mul_ref
from engine_core.layers.attention import (
    causal_attention_ref,
    paged_attention_ref,
    write_kv_cache_ref,
)
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.layers.layernorm import rms_norm_ref
from engine_core.layers.rotary import apply_rotary_ref, compute_cos_sin_cache

_KERNEL_MODULES = ("reshape_and_cache", "paged_decode_attention", "paged_prefill_attention",
                   "paged_attention", "fused_add_rmsnorm", "rotary", "silu_and_mul", "fp8_gemv")


def test_interpreter_suite_in_subprocess():
    if _IN_PROCESS:
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _fix_interpreter_scalar_index() -> None:
    """triton 3.6's interpreter holds scalars as 1-element arrays and turns them into loop bounds
    with int(array), which numpy >= 2.3 rejects (`range(start, end)` with a loaded `end` then
    fails). Make the hook read the single element instead; idempotent, touches only the
    interpreter."""
    import triton.runtime.interpreter as interp
    orig = interp._patch_lang_tensor
    if getattr(orig, "_scalar_index_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    patched._scalar_index_fix = True
    interp._patch_lang_tensor = patched


@pytest.fixture(scope="module")
def K():
    if not _IN_PROCESS:
        pytest.skip("triton was imported in compiled mode: see test_interpreter_suite_in_subprocess")
    import importlib

    _fix_interpreter_scalar_index()

    from triton.runtime.interpreter import InterpretedFunction
    mods = {m: importlib.import_module(f"engine_core.kernels.{m}") for m in _KERNEL_MODULES}
    assert isinstance(mods["paged_decode_attention"]._decode_split_kernel, InterpretedFunction)
    return mods


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- batch geometry

def _make_batch(query_lens, seq_lens, block_size, hkv, d, dtype, gen, num_decodes=0, pad_rows=0,
                cache_dtype=None):
    """A step of len(query_lens) requests with random, non-contiguous block tables (block 0 is the
    reserved null block), a NaN-poisoned cache holding each request's prefix, and this step's
    K/V still to be written. Returns (md, kv_cache, q, k_new, v_new)."""
    cache_dtype = cache_dtype or dtype
    B = len(query_lens)
    nblk = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(nblk) + 3
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # shuffled ids, never 0
    max_blocks = max(nblk) + 1
    block_tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    for i, n in enumerate(nblk):
        block_tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, block_size, hkv, d), float("nan"), dtype=cache_dtype)
    kv_cache[:, 0] = 0  # the reserved null block stays zero (the torch twin reads it for padding)
    flat = kv_cache.view(2, -1, hkv, d)
    slots = []
    for i, (L, S) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(S)
        slot = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        flat[:, slot[:S - L]] = torch.randn(2, S - L, hkv, d, generator=gen).to(cache_dtype)  # cached prefix
        slots.append(slot[S - L:])
    T = sum(query_lens) + pad_rows
    slot_mapping = torch.cat(slots + [torch.full((pad_rows,), -1, dtype=torch.long)])
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    md = AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables, block_size=block_size, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        num_decodes=num_decodes)
    k_new = torch.randn(T, hkv, d, generator=gen).to(dtype)
    v_new = torch.randn(T, hkv, d, generator=gen).to(dtype)
    return md, kv_cache, k_new, v_new


def _query(T, hq, d, dtype, gen):
    return torch.randn(T, hq, d, generator=gen).to(dtype)


# ----------------------------------------------------------------------------- KV write

@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
def test_reshape_and_cache(K, dtype, cache_dtype):
    gen = torch.Generator().manual_seed(0)
    md, cache, k, _ = _make_batch([3, 1, 9], [3, 12, 20], 8, 3, 16, dtype, gen, pad_rows=2,
                                  cache_dtype=cache_dtype)
    # K/V as strided views into a fused projection output, as the model produces them
    qkv = torch.randn(k.shape[0], 2 * 48 + 32, generator=gen).to(dtype)
    k_view = qkv[:, :48].view(-1, 3, 16)
    v_view = qkv[:, 48:96].view(-1, 3, 16)
    ref = cache.clone()
    write_kv_cache_ref(k_view, v_view, ref, md.slot_mapping)
    out = cache.clone()
    K["reshape_and_cache"].reshape_and_cache(k_view, v_view, out, md.slot_mapping)
    # block 0 is the null block: the twin parks padding rows there, the kernel skips them.
    # Exact, except that the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even).
    tol = {"rtol": 8e-3, "atol": 0} if dtype != cache_dtype else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(out[:, 1:].nan_to_num(123.0), ref[:, 1:].nan_to_num(123.0), **tol)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


# ----------------------------------------------------------------------------- decode

DECODE_SEQ_LENS = [1, 7, 8, 9, 16, 17, 33, 47, 64, 70]  # cross block (8/16), tile (16) and split edges


# (block_size, max_splits, min_split) with block_n = 16: split_len(S) = max(min_split, 16 * ceil(ceil(S / max_splits) / 16))
#  (8, 1, 16): one split (the direct-output path); (8, 4, 16): S=70 -> 3 splits of 32, S=47 -> 3 of 16;
#  (16, 2, 32): S=70 -> 2 splits of 48, S=33 -> 2 of 32.
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)])  # GQA ratios 1, 3, 8
@pytest.mark.parametrize("block_size,max_splits,min_split", [(8, 1, 16), (8, 4, 16), (16, 2, 32)])
def test_paged_decode(K, hq, hkv, block_size, max_splits, min_split):
    gen = torch.Generator().manual_seed(hq * 100 + block_size + max_splits)
    d, dtype = 32, torch.float32
    seq_lens = DECODE_SEQ_LENS
    md, cache, k, v = _make_batch([1] * len(seq_lens), seq_lens, block_size, hkv, d, dtype, gen,
                                  num_decodes=len(seq_lens))
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    q = _query(len(seq_lens), hq, d, dtype, gen)
    scale = d ** -0.5
    ref = paged_attention_ref(q, cache, md, scale)
    mod = K["paged_decode_attention"]
    kw = {"max_splits": max_splits, "min_split": min_split, "block_n": 16}
    out = mod.paged_decode_attention(q, cache[0], cache[1], md.block_tables, md.seq_lens, scale,
                                     md.max_seq_len, **kw)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-5, _rel_err(out, ref)
    # a grid sized for a longer max_seq_len (the CUDA-graph case) gives the very same bits
    out2 = mod.paged_decode_attention(q, cache[0], cache[1], md.block_tables, md.seq_lens, scale, 4096, **kw)
    assert torch.equal(out, out2)
    # batch invariance: a sequence's output does not depend on the rest of the batch
    out3 = mod.paged_decode_attention(q[3:5], cache[0], cache[1], md.block_tables[3:5], md.seq_lens[3:5],
                                      scale, md.max_seq_len, **kw)
    assert torch.equal(out[3:5], out3)


@pytest.mark.parametrize("d", [64, 128])
def test_paged_decode_fp16_head_dims(K, d):
    gen = torch.Generator().manual_seed(d)
    hq, hkv, seq_lens = 4, 2, [5, 40, 129]
    md, cache, k, v = _make_batch([1] * 3, seq_lens, 16, hkv, d, torch.float16, gen, num_decodes=3)
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    q = _query(3, hq, d, torch.float16, gen)
    ref = paged_attention_ref(q.float(), cache.float(), md, d ** -0.5)
    mod = K["paged_decode_attention"]
    for kw in ({}, {"min_split": 64}):  # defaults (one split here) and 3 splits of 64 for S = 129
        out = mod.paged_decode_attention(q, cache[0], cache[1], md.block_tables, md.seq_lens, d ** -0.5,
                                         md.max_seq_len, **kw)
        assert out.dtype == torch.float16
        assert _rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("seq_lens", [[1, 9, 16], [5, 40, 17]])
def test_paged_decode_graph_sized_grid_is_bit_identical(K, seq_lens):
    """Eager (grid sized by this step's max_seq_len: 1 split -> the direct-output path, or 3) and a
    CUDA-graph launch (grid sized by max_model_len: 4 splits) must agree bit for bit."""
    gen = torch.Generator().manual_seed(len(seq_lens) + seq_lens[-1])
    md, cache, k, v = _make_batch([1] * 3, seq_lens, 8, 2, 16, torch.float32, gen, num_decodes=3)
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    q = _query(3, 4, 16, torch.float32, gen)
    mod = K["paged_decode_attention"]
    kw = {"max_splits": 4, "min_split": 16, "block_n": 16}
    eager = mod.paged_decode_attention(q, cache[0], cache[1], md.block_tables, md.seq_lens, 0.25, md.max_seq_len, **kw)
    graph = mod.paged_decode_attention(q, cache[0], cache[1], md.block_tables, md.seq_lens, 0.25, 4096, **kw)
    assert torch.equal(eager, graph)
    assert _rel_err(eager, paged_attention_ref(q, cache, md, 0.25)) < 1e-5


def test_paged_decode_padding_rows_are_zero(K):
    """seq_len 0 (CUDA-graph padding) gives zeros, with and without splits, and never NaN."""
    gen = torch.Generator().manual_seed(1)
    md, cache, k, v = _make_batch([1, 1], [9, 20], 8, 2, 16, torch.float32, gen, num_decodes=2)
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    q = _query(3, 4, 16, torch.float32, gen)
    seq_lens = torch.tensor([9, 0, 20], dtype=torch.int32)
    bt = torch.cat([md.block_tables[:1], torch.zeros_like(md.block_tables[:1]), md.block_tables[1:]])
    mod = K["paged_decode_attention"]
    for max_splits in (1, 4):
        out = mod.paged_decode_attention(q, cache[0], cache[1], bt, seq_lens, 0.25, 20, max_splits=max_splits,
                                         min_split=16, block_n=16)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        ref = paged_attention_ref(q[[0, 2]], cache, md, 0.25)
        assert _rel_err(out[[0, 2]], ref) < 1e-5


# ----------------------------------------------------------------------------- prefill / mixed

@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_paged_prefill_with_cached_prefix(K, hq, hkv, block_size):
    gen = torch.Generator().manual_seed(hq + block_size)
    d, dtype = 32, torch.float32
    query_lens = [5, 17, 1, 33, 8]
    seq_lens = [5, 30, 9, 40, 24]  # cached prefixes 0, 13, 8, 7, 16 (whole / partial blocks)
    md, cache, k, v = _make_batch(query_lens, seq_lens, block_size, hkv, d, dtype, gen)
    write_kv_cache_ref(k, v, cache, md.slot_mapping)
    q = _query(sum(query_lens), hq, d, dtype, gen)
    scale = d ** -0.5
    ref = paged_attention_ref(q, cache, md, scale)
    out = torch.full_like(q, float("nan"))
    K["paged_prefill_attention"].paged_prefill_attention(
        q, cache[0], cache[1], md.block_tables, md.seq_lens, md.query_start_loc, 0, len(query_lens),
        md.max_query_len, scale, out, block_m=16, block_n=16)
    assert not out.isnan().any()  # every row written
    assert _rel_err(out, ref) < 1e-5, _rel_err(out, ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_mixed_step_dispatch(K, dtype, tol):
    """decodes first, then chunked prefills, then padding rows: the full-step dispatcher, with the
    KV write done by the reshape_and_cache kernel."""
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d = 6, 2, 64
    query_lens = [1, 1, 1, 12, 4, 20]
    seq_lens = [17, 3, 48, 12, 21, 36]
    md, cache, k, v = _make_batch(query_lens, seq_lens, 16, hkv, d, dtype, gen, num_decodes=3, pad_rows=3)
    q = _query(sum(query_lens) + 3, hq, d, dtype, gen)
    ref_cache = cache.clone()
    write_kv_cache_ref(k, v, ref_cache, md.slot_mapping)
    ref = paged_attention_ref(q.float(), ref_cache.float(), md, d ** -0.5)
    K["reshape_and_cache"].reshape_and_cache(k, v, cache, md.slot_mapping)
    out = K["paged_attention"].paged_attention(q, cache, md, d ** -0.5, min_split=16, block_n=16)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))
    assert _rel_err(out, ref) < tol, _rel_err(out, ref)


def test_varlen_causal_no_cache(K):
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d = 8, 1, 32
    query_lens = [7, 20, 1]
    md, _, k, v = _make_batch(query_lens, query_lens, 8, hkv, d, torch.float32, gen)
    q = _query(sum(query_lens), hq, d, torch.float32, gen)
    ref = causal_attention_ref(q, k, v, md, 0.2)
    out = K["paged_attention"].causal_attention(q, k, v, md, 0.2)
    assert _rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------- norms, rotary, act

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 96])
def test_rms_norm(K, dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=gen).to(dtype)
    res = torch.randn(5, n, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)
    mod = K["fused_add_rmsnorm"]
    exact = dtype == torch.float32
    out = mod.rms_norm(x, w, 1e-6)
    ref = rms_norm_ref(x, w, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5 if exact else 1.6e-2, atol=1e-5 if exact else 1e-2)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, res)
    x2, r2 = x.clone(), res.clone()
    o, r = mod.fused_add_rms_norm(x2, r2, w, 1e-6)
    assert o.data_ptr() == x2.data_ptr() and r.data_ptr() == r2.data_ptr()  # in place
    # fp32: exact. bf16: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
    torch.testing.assert_close(r, ref_res, rtol=0 if exact else 8e-3, atol=0)
    torch.testing.assert_close(o, ref_out, rtol=1e-5 if exact else 1.6e-2, atol=1e-5 if exact else 1e-2)
    # per-head norm over a strided view (Qwen3 q_norm on a slice of qkv)
    qkv = torch.randn(3, 4 * n, generator=gen).to(dtype)
    qh = qkv[:, :2 * n].reshape(3, 2, n)
    torch.testing.assert_close(mod.rms_norm(qh, w, 1e-6), rms_norm_ref(qh, w, 1e-6),
                               rtol=1e-5 if exact else 1.6e-2, atol=1e-5 if exact else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (64, 32)])
def test_rotary_in_place(K, dtype, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    T, hq, hk = 6, 6, 2
    cache = compute_cos_sin_cache(rotary_dim, 100, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 32})
    positions = torch.randint(0, 100, (T,), generator=gen)
    qkv = torch.randn(T, (hq + 2 * hk) * head_dim, generator=gen).to(dtype)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)  # strided views
    ref_q = apply_rotary_ref(positions, q, cache, head_dim)
    ref_k = apply_rotary_ref(positions, k, cache, head_dim)
    v_before = qkv[:, (hq + hk) * head_dim:].clone()
    oq, ok_ = K["rotary"].rotary_embedding(positions, q, k, cache, head_dim)
    assert oq.data_ptr() == q.data_ptr() and ok_.data_ptr() == k.data_ptr()  # in place
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(q, ref_q, **tol)
    torch.testing.assert_close(k, ref_k, **tol)
    assert torch.equal(qkv[:, (hq + hk) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("head_dim,rotary_dim", [(32, 32), (64, 32)])
def test_rotary_and_cache_equals_rotary_then_cache_write(K, dtype, cache_dtype, head_dim, rotary_dim):
    """The fused kernel (the CUDA paged path of Attention with rope) = rotary_embedding followed by
    reshape_and_cache: same q, same cache contents, padding rows (slot -1) not written."""
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    T, hq, hk, bs, nblk = 6, 6, 2, 4, 5
    cos_sin = compute_cos_sin_cache(rotary_dim, 100, 10000.0)
    positions = torch.randint(0, 100, (T,), generator=gen)
    slots = torch.tensor([5, 6, 7, 12, -1, 19])
    qkv = torch.randn(T, (hq + 2 * hk) * head_dim, generator=gen).to(dtype)
    cache = torch.randn(2, nblk, bs, hk, head_dim, generator=gen).to(cache_dtype)

    def split(t):
        q, k, v = t.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
        return q, k.view(T, hk, head_dim), v.view(T, hk, head_dim)

    ref_qkv, ref_cache = qkv.clone(), cache.clone()
    q, k, v = split(ref_qkv)
    K["rotary"].rotary_embedding(positions, q, k, cos_sin, head_dim)
    K["reshape_and_cache"].reshape_and_cache(k, v, ref_cache, slots)
    got_qkv, got_cache = qkv.clone(), cache.clone()
    q, k, v = split(got_qkv)
    out = K["rotary"].rotary_and_cache(positions, q, k, v, cos_sin, head_dim, got_cache, slots)
    assert out.data_ptr() == q.data_ptr()
    torch.testing.assert_close(got_qkv[:, :hq * head_dim], ref_qkv[:, :hq * head_dim], rtol=0, atol=0)
    torch.testing.assert_close(got_cache, ref_cache, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [24, 1500])  # 1500: two column blocks of 1024
def test_silu_and_mul(K, dtype, d):
    gen = torch.Generator().manual_seed(d)
    x = (3 * torch.randn(2, 3, 2 * d, generator=gen)).to(dtype)
    out = K["silu_and_mul"].silu_and_mul(x)
    ref = silu_and_mul_ref(x)
    assert out.shape == ref.shape
    # bf16: two roundings, each a truncation in the interpreter -> up to 2 ulp
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(out, ref, **tol)


# ----------------------------------------------------------------------------- fp8 weight-only GEMM

# (M, N, K, config): the one-row reduce path and the tensor-core dot path, each with and without
# split-K, at ragged N/K/M edges. The interpreter's bf16 dot is wrong (docstring): dot path in fp16.
@pytest.mark.parametrize("m,n,k,config,dtype", [
    (1, 40, 96, (1, 16, 32, 1, 4, 1), torch.bfloat16),
    (1, 40, 96, (1, 16, 32, 2, 4, 1), torch.float16),
    (1, 33, 200, (1, 16, 64, 4, 4, 1), torch.bfloat16),
    (3, 40, 96, (16, 16, 32, 1, 4, 1), torch.float16),
    (5, 33, 64, (16, 16, 32, 2, 4, 1), torch.float16),
    (17, 48, 64, (16, 32, 32, 1, 4, 1), torch.float16),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_weight_only_gemm(K, m, n, k, config, dtype, with_bias):
    from engine_core.layers.fp8_linear import (
        fp8_weight_only_ref,
        quantize_fp8_per_channel,
    )
    gen = torch.Generator().manual_seed(m * 1000 + n)
    q, scale = quantize_fp8_per_channel(torch.randn(n, k, generator=gen) * 0.1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    got = K["fp8_gemv"].fp8_w8a16(x, q, scale, bias, config)
    ref = fp8_weight_only_ref(x, q, scale, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    # fp32 accumulation both sides; one output rounding (the interpreter truncates to bf16)
    assert _rel_err(got, ref) < 8e-3
