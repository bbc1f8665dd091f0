"""SiLU-and-multiply for gated MLPs: x = [gate | up] (last dim 2d) -> silu(gate) * up (last dim d).

Torch twin: engine_core.layers.activation.silu_and_mul_ref.

One fused pass (read x once, write half as much) instead of torch's three kernels and two
intermediates. Grid: (rows, column blocks of BLOCK). The arithmetic mirrors the twin's rounding:
silu(gate) is computed in fp32 and rounded to x's dtype (F.silu's output), then multiplied by up
in fp32 and rounded once more (torch's elementwise multiply).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine_core.kernels import pdl_launch_args


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # before any load: the previous kernel has completed (kernels.pdl_enabled)
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> [..., d] (new tensor, x's dtype)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, d), dtype=x.dtype, device=x.device)
    if M and d:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(M, triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                         BLOCK=block, num_warps=4,
                                                         **pdl_launch_args(x.device))
    return out.view(*x.shape[:-1], d)
