"""FP8 (e4m3) linear layer for Hopper/Ada (`--quantization fp8`).

Weights: one scale per output channel (amax / 448), stored e4m3 [N, K] (K contiguous; its
transpose view is the column-major second operand `torch._scaled_mm` wants). Two paths by rows:
- few rows (decode, M <= WEIGHT_ONLY_MAX_ROWS): weight-only, a Triton kernel that streams the e4m3
  weight, widens it in registers and multiplies bf16 activations (engine_core/kernels/fp8_gemv.py).
  Bound by weight bytes, so half of bf16's time; activations are not rounded.
- many rows (prefill): w8a8. Activations get one scale per token on the fly (dynamic, no
  calibration; engine_core/kernels/fp8_quant.py), then an fp8 tensor-core GEMM with both scale
  vectors applied in its epilogue (rowwise scaling).
On CPU (the numerics tests) both paths run as their torch twins below. Decode steps stay
CUDA-graph capturable (the path is chosen per captured batch size).
"""
from __future__ import annotations

import torch
from torch import nn

from engine_core.kernels import triton_available

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def check_fp8_supported(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError("--quantization fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); "
                         "on CPU use --quantization int8 or int4")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"--quantization fp8 needs compute capability >= 8.9, this GPU has {major}.{minor}")


def fp8_channel_scales(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> fp32 [N]: each output row's amax / 448 (its largest weight maps to e4m3's max)."""
    return (w.float().abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)


def to_e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale rounded to e4m3, saturating at +-448 (a plain cast would make NaNs)."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], fp32 scales [N]) with w ~= q * scale[:, None]."""
    scale = fp8_channel_scales(w)
    return to_e4m3(w, scale[:, None]), scale


# Up to this many rows the weight-only kernel beats quantize + _scaled_mm (H200 sweep:
# benchmarks/fp8_gemv_sweep.py).
WEIGHT_ONLY_MAX_ROWS = 16


def fp8_weight_only_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Torch twin of kernels.fp8_gemv.fp8_w8a16: x @ (w * scale[:, None]).T in fp32, x's dtype out."""
    y = x.float() @ (w.float() * scale.float()[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_w8a8_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """Torch twin of per-token activation quantization + torch._scaled_mm (rowwise scales)."""
    xq, xs = quantize_fp8_per_token(x)
    y = (xq.float() @ w.float().t()) * xs * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1])."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Module, dtype: torch.dtype,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`linear`'s weight rounded to nearest, or `quantized` = (e4m3 [N, K], fp32 scales [N])
        computed elsewhere (GPTQ, a pre-quantized checkpoint); `linear` then gives shape and bias."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"fp8 GEMMs need dims that are multiples of 16, got "
                             f"{self.out_features}x{self.in_features}")
        q, scale = quantize_fp8_per_channel(linear.weight.data) if quantized is None else quantized
        if q.dtype != FP8 or tuple(q.shape) != (self.out_features, self.in_features) or scale.numel() != q.shape[0]:
            raise ValueError(f"expected e4m3 [{self.out_features}, {self.in_features}] and {self.out_features} "
                             f"scales, got {q.dtype} {tuple(q.shape)} and {scale.numel()}")
        q, scale = q.contiguous(), scale.reshape(-1).float()
        self.register_buffer("qweight_t", q.t())  # [K, N] column-major: _scaled_mm's mat2 layout
        self.register_buffer("scales", scale[None, :].contiguous())  # [1, N]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.to(dtype))
        self.out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w = self.qweight_t.t()  # [N, K], K contiguous
        weight_only = x2.shape[0] <= WEIGHT_ONLY_MAX_ROWS
        if x2.is_cuda and triton_available():
            if weight_only:
                from engine_core.kernels.fp8_gemv import fp8_w8a16
                y = fp8_w8a16(x2.to(self.out_dtype), w, self.scales[0], self.bias)
            else:
                from engine_core.kernels.fp8_quant import per_token_quant_fp8
                xq, xs = per_token_quant_fp8(x2, FP8_MAX)
                y = torch._scaled_mm(xq, self.qweight_t, scale_a=xs, scale_b=self.scales, bias=self.bias,
                                     out_dtype=self.out_dtype)
        elif weight_only:
            y = fp8_weight_only_ref(x2, w, self.scales[0], self.bias)
        else:
            y = fp8_w8a8_ref(x2, w, self.scales[0], self.bias, self.out_dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel"
