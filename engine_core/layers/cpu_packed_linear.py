"""bf16 linear layers on CPU with their weights prepacked for oneDNN.

`F.linear` on a CPU bf16 weight hands oneDNN a plain [N, K] matrix, which it reorders into its
blocked (AMX / AVX-512) layout on every call: the weight is read twice and written once per GEMM.
Packing once at load (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's CPU freezing
pass does) and calling `torch.ops.mkldnn._linear_pointwise` skips that. Measured on 2 Sapphire
Rapids cores, bf16, per GEMM: SmolLM2's gate_up (3072x576) 1.5-1.7x faster at 1-128 rows, its LM
head (49152x576) 1.7x at 1 row; outputs equal F.linear's (same kernels, same fp32 accumulation;
the tests compare them).

Applied by the loader to every plain linear layer of a CPU model in bf16 (after
`--quantization`, which leaves none where it applies), tied LM head included: its packed copy
costs the head's bytes once more (the embedding keeps the plain rows for its lookups). Not with
tensor parallelism, and only where the CPU runs bf16 in hardware (AMX / AVX512-BF16). Where the ops are
missing (a torch without oneDNN) the layers stay as they are.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine_core.cpu_resources import cpu_capabilities
from engine_core.layers.linear import Linear

logger = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16,)


def _ops_available() -> bool:
    """oneDNN's packing ops exist and this CPU runs bf16 GEMMs in hardware (AMX / AVX512-BF16):
    `_linear_pointwise` calls oneDNN directly, without the fallback F.linear has for CPUs where
    oneDNN has no bf16 kernels, so elsewhere the layers stay plain."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and cpu_capabilities().native_bf16)


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held in oneDNN's blocked layout (an opaque mkldnn tensor)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.data
        # Not a registered buffer: an mkldnn tensor has no storage (state_dict, resident-byte
        # accounting and device moves all expect one). `packed_bytes` is what it holds.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
        self.packed_bytes = w.numel() * w.element_size()
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def _packable(m: nn.Module) -> bool:
    """A plain float linear layer (any of linear.py's: at world size 1 each is y = x W^T + b)."""
    if not isinstance(m, Linear):
        return False
    tp = m.__dict__.get("tp")
    return (tp is None or tp.world_size == 1) and m.weight.dtype in PACKED_DTYPES and m.weight.device.type == "cpu"


def pack_cpu_linears(model: nn.Module) -> int:
    """Swap the model's plain bf16 CPU linear layers for PackedLinear, in place. Returns how
    many were swapped (0 where oneDNN's packing is unavailable or fails)."""
    if not _ops_available():
        return 0
    targets = [(name, m) for name, m in model.named_modules() if _packable(m)]
    swapped = 0
    for name, m in targets:
        try:
            new = PackedLinear(m)
            if not swapped:  # the first layer also runs once: a oneDNN that cannot, fails here, not mid-serve
                new(torch.zeros(1, new.in_features, dtype=m.weight.dtype))
        except RuntimeError as e:  # e.g. a oneDNN build without kernels for this dtype: keep F.linear
            logger.warning("oneDNN weight packing unavailable (%s); linear layers stay unpacked", e)
            return swapped
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped += 1
    return swapped
