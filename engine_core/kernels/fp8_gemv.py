"""FP8 weight-only GEMM for few rows (decode): y = x @ (w_e4m3 * scale[:, None]).T (+ bias).

Torch twin: engine_core.layers.fp8_linear.fp8_weight_only_ref.

At decode batch sizes a linear layer is bound by the bytes of weights it reads, not by math.
`torch._scaled_mm` (the large-batch path) first quantizes the activations and runs an fp8 tensor-core
GEMM tuned for big tiles; at M = 1 it read the 8B model's weights no faster than bf16 did (fp8 was
0.94x bf16 end to end, H200). This kernel streams the e4m3 weight once, widens it to bf16 in
registers and keeps the activations in bf16, so it reads half of bf16's bytes and also skips the
activation quantization (better accuracy: only the weights are rounded).

Grid: (N / BLOCK_N * M / BLOCK_M, SPLIT_K). Each program owns BLOCK_N output channels of BLOCK_M rows and walks
K; with BLOCK_M = 16 the product is a tensor-core dot (rows past M are masked), with BLOCK_M = 1 it
is a multiply-and-reduce, which suits one row. SPLIT_K > 1 splits K over programs and adds their
fp32 partial sums atomically (more programs in flight for short-and-wide layers); the caller then
zeroes the fp32 output first and casts it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine_core.kernels import pdl_launch_args


@triton.jit
def _fp8_w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # before any load: the previous kernel has completed (kernels.pdl_enabled)
        gdc_wait()
        gdc_launch_dependents()
    # Rows vary fastest over consecutive programs, so the programs of one weight tile run together
    # and all but the first read it from L2 (the one-row path, launched once per row).
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(0) // num_m
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        ks = k + rk
        k_mask = ks < k_hi
        w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK]
        x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0)
    if BLOCK_M == 1:
        out = acc * scale
        if HAS_BIAS and pid_k == 0:
            out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        y = y_ptr + pid_m * stride_ym + rn
        if SPLIT_K == 1:
            tl.store(y, out.to(y_ptr.dtype.element_ty), mask=n_mask & (pid_m < M))
        else:
            tl.atomic_add(y, out, mask=n_mask & (pid_m < M))
    else:
        out = acc * scale[None, :]
        if HAS_BIAS and pid_k == 0:
            out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y, out.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y, out, mask=mask)


def pick_config(M: int, N: int, K: int, num_sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for a shape, from a sweep over
    Llama-3.1-8B's layers on an H200 (benchmarks/fp8_gemv_sweep.py --sweep,
    benchmarks/results/fp8_gemv_*):
    - one row: multiply-and-reduce over wide K tiles (2048 e4m3 = 2 KiB per weight row per
      iteration: many 16-byte loads in flight per thread, which Triton does not pipeline for
      non-dot loops), 4-8 rows per program: 3.3-4.4 TB/s of weights, 1.9x bf16 F.linear;
    - 2-16 rows: the tensor-core dot, split over K until about two programs per SM."""
    if M == 1:
        block_k = min(2048, triton.next_power_of_2(K))
        return 1, 4 if N <= 4096 else 8, block_k, 1, 4, 1
    block_n = 32 if N >= 16384 else 64
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, 16)
    split_k = 1
    while programs * split_k < 2 * num_sms and K // (split_k * 2) >= 1024:
        split_k *= 2
    return 16, block_n, 256, split_k, 4 if block_n == 32 else 8, 3


def fp8_w8a16(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              config: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16), w [N, K] e4m3 (K contiguous), scale [N] fp32 -> y [M, N] in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    N = w.shape[0]
    if config is None:
        config = pick_config(M, N, K, _num_sms(x.device))
    block_m, block_n, block_k, split_k, warps, stages = config
    if split_k == 1:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    if M and N:
        grid = (triton.cdiv(N, block_n) * triton.cdiv(M, block_m), split_k)
        _fp8_w8a16_kernel[grid](x, w, scale, bias if bias is not None else scale, y, M, N, K,
                                x.stride(0), w.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                                num_warps=warps, num_stages=stages, **pdl_launch_args(x.device))
    return y if split_k == 1 else y.to(x.dtype)


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
