"""RMSNorm and fused residual-add + RMSNorm (vLLM convention, in place).

Torch twin: engine_core.layers.layernorm.rms_norm_ref.

    rms_norm(x, w)                     -> w * norm(x)                          (new tensor)
    fused_add_rms_norm(x, res, w)      -> x   <- w * norm(x + res)             (in place)
                                          res <- x + res  (rounded to the input dtype)

One program per row; the whole row (hidden size up to BLOCK = next power of 2) sits in registers,
so x and the residual are read once and both results written once - the unfused torch version
makes ~6 passes over the row. Arithmetic mirrors the twin step by step so bf16 results match
it bit for bit in almost every element: the sum and the statistics are fp32, the norm of the
*fp32* sum is rounded to the input dtype, then multiplied by the weight (in fp32, rounded once).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine_core.kernels import pdl_launch_args


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # before any load: the previous kernel has completed (kernels.pdl_enabled)
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        xf += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * stride_ro + cols, xf.to(x.dtype), mask=mask)
    var = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a view when possible, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain RMSNorm over the last dim; returns a new tensor of x's shape and dtype."""
    x2 = _rows(x)
    M, N = x2.shape
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(M,)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, N, eps,
                               HAS_RESIDUAL=False, BLOCK=block, num_warps=_num_warps(block),
                               **pdl_launch_args(x.device))
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual, x <- RMSNorm(x + residual). Returns (x, residual).
    (If either is not row-addressable without a copy, the copy is updated and returned instead.)"""
    assert x.shape == residual.shape and x.dtype == residual.dtype
    x2, r2 = _rows(x), _rows(residual)
    M, N = x2.shape
    if M:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(M,)](x2, r2, weight, x2, r2, x2.stride(0), r2.stride(0), x2.stride(0),
                               r2.stride(0), N, eps, HAS_RESIDUAL=True, BLOCK=block,
                               num_warps=_num_warps(block), **pdl_launch_args(x.device))
    return x2.view(x.shape), r2.view(residual.shape)
