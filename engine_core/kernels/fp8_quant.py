"""Per-token dynamic FP8 (e4m3) quantization of activations, one kernel per GEMM input.

Torch twin: engine_core.layers.fp8_linear.quantize_fp8_per_token.

The twin is ~8 elementwise kernels (abs, amax, cast, divide, clamp, ...); at batch 1 each is a few
microseconds of launch latency before every fp8 GEMM, which cost more than the halved weight bytes
saved (measured on an H200, Llama-3.1-8B bs1). One program per row: pass 1 finds the row's absmax,
pass 2 writes x / scale as e4m3 and the fp32 scale (absmax / 448, floored like the twin).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _per_token_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * K
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, K, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, 1e-12)
    tl.store(s_ptr + row, scale)
    for off in range(0, K, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)


def per_token_quant_fp8(x: torch.Tensor, fp8_max: float = 448.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M and K:
        block = min(2048, triton.next_power_of_2(K))
        _per_token_quant_fp8_kernel[(M,)](x, q, s, K, x.stride(0), FP8_MAX=fp8_max, BLOCK=block, num_warps=8)
    return q, s
