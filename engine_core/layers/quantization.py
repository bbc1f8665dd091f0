"""Weight-only quantization of a loaded model (`--quantization int8|int4|fp8`).

After the checkpoint is loaded, every linear layer is swapped for one holding packed low-bit
weights, so a decode step (bound by the bytes of weights it reads) reads 4x (int8) or ~7x (int4)
fewer bytes than fp32:

- int8 (CPU): symmetric per-output-channel scales.
- int4 (CPU): asymmetric groups of 32 along the input dim (value = q * scale + min, q in 0..15).
  This is GGUF Q4_1's format, so a Q4_1 checkpoint tensor goes in as its codes (or, dequantized,
  re-quantizes to the same codes): the llama.cpp weights, kept at 4 bit.
- Few rows (decode) run the C++ kernels of kernels/cpu_quant_gemv.cpp where they are built: the
  activations are quantized for the call (groups of 32, two int8 digits: ~15 bits) and every weight
  row is an integer dot product (AVX512-VNNI / AVX2), as llama.cpp computes Q4_1 x Q8_1 -- 1.4-1.8x
  torch's kernels, which widen each weight to float (twins: int4_linear_ref, int8_linear_ref). Without the C++ kernels,
  `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int8pack_mm` (float activations); int4 is then
  stored in torch's int4pack layout. Many rows (prefill) dequantize to bf16 for one dense GEMM.
  The LM head stays int8, as llama.cpp keeps it at Q8_0 in Q4 files: at int4 SmolLM2's perplexity on
  tests/data/perplexity_text.txt rose 5.2 % (int8 head: within the test's bound), although the int4
  kernel reads the 49152x576 head ~3x faster (1.3 ms vs 3.8 ms per decode step on one core).
- fp8 (CUDA, compute capability >= 8.9): e4m3 weights with per-output-channel scales; decode rows
  run weight-only (a Triton kernel widens the weights in registers), prefill rows quantize the
  activations per token on the fly for `torch._scaled_mm` (rowwise scales) --
  engine_core/layers/fp8_linear.py. The LM head stays in the model dtype (on SmolLM2 an fp8 head
  added 1.8 % perplexity on tests/data/perplexity_text.txt; it is 1/16 of an 8B model's weights).

The token embedding is kept as int8 rows with one scale per row for all three (a lookup reads one
row per token; the table is the biggest tensor of small models). Tensor parallelism is not combined
with quantization here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_core.kernels.cpu_ops import cpu_ops
from engine_core.layers.linear import Linear, VocabEmbedding, _tensor
from engine_core.loader.gguf_q4_1 import Q4_1_GROUP, Q4_1Weight

QUANTIZATIONS = ("int8", "int4", "fp8")
INT4_GROUP_SIZE = 32
INT4_PACK_BLOCK_N = 64  # the CPU int4 pack stores rows in blocks of 64: [N/64, K, 32] bytes
# The packed-weight CPU kernels are GEMV loops: their time grows linearly with the rows (measured
# ~25 us per row for a 1536x576 weight on 2 AVX-512 cores), so at some row count dequantizing the
# weight to bf16 once per call and running a dense bf16 GEMM (oneDNN, AMX where present) wins:
# ~16 rows for int8 (a cast and a multiply), ~64 for int4 (unpacking nibbles costs more).
# The CPU kernels have vectorized paths for bf16 activations only (fp32 ones are scalar loops,
# ~10x slower): the quantized layers compute in bf16 and return the caller's dtype.
CPU_COMPUTE_DTYPE = torch.bfloat16
# The kernels' direct Python bindings where torch has them: torch.ops.aten.<op>(...) resolves its
# overload in Python on every call (~1.2 us, x120 GEMVs per decode step).
_INT8_MM = getattr(torch, "_weight_int8pack_mm", torch.ops.aten._weight_int8pack_mm)
_INT4_MM = getattr(torch, "_weight_int4pack_mm_for_cpu", torch.ops.aten._weight_int4pack_mm_for_cpu)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], fp32 scales [N]) with w ~= q * scale[:, None]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE, param_dtype: torch.dtype = torch.float32
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes int32 [N, K] in 0..15, scale [N, K/G], min [N, K/G]) with
    w ~= q * scale + min per group of `group_size` along K. The scale and min are rounded to
    `param_dtype` (how they are stored) before the codes are chosen against them."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(dim=-1).to(param_dtype).float()
    scale = ((g.amax(dim=-1) - lo) / 15.0).clamp_min(1e-12).to(param_dtype).float()
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


# ---- the C++ kernels' numerics (kernels/cpu_quant_gemv.cpp), as torch ops: test oracles
ACT_GROUP = 32  # activations are quantized to int8 in groups of 32 inputs for the integer dot products
KERNEL_CHUNK = 64  # the kernels' K step: two groups; their int4 codes pack a chunk's halves into one byte


def quantize_activations_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (v [M, K/32, 32] integers (float), scale [M, K/32], sum of x [M, K/32]) with
    x ~= v * scale per group, v = 256 * q1 + q2 (two int8 digits, see cpu_quant_gemv.cpp): q1 in
    -127..127 at absmax / 127 (round half to even), q2 its rounding error in 1/256ths."""
    g = x.float().reshape(x.shape[0], -1, ACT_GROUP)
    amax = g.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    t = g * inv[..., None]
    q1 = torch.round(t)
    return 256 * q1 + torch.round((t - q1) * 256).clamp_(-127, 127), amax / 127.0 / 256, g.sum(dim=-1)


INT4_BLOCK_ROWS, INT4_SEGMENT_CHUNKS = 4, 8  # the kernel's int4 stream: blocks of 4 rows, segments of 8 chunks
# bytes of a block per chunk: 4 rows x (32 code bytes + the fp16 scale and min of 2 groups)
INT4_BLOCK_CHUNK_BYTES = INT4_BLOCK_ROWS * (KERNEL_CHUNK // 2 + 2 * 2 * 2)


def _int4_segments(k: int) -> list[tuple[int, int]]:
    chunks = k // KERNEL_CHUNK
    return [(c0, min(INT4_SEGMENT_CHUNKS, chunks - c0)) for c0 in range(0, chunks, INT4_SEGMENT_CHUNKS)]


def pack_int4_blocks(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15, scale / min [N, K/32] -> the kernel's stream, uint8 [N/4, 5K/2]
    (layout: the header of cpu_quant_gemv.cpp). N a multiple of 4, K of 64."""
    n, k = codes.shape
    nb, half = n // INT4_BLOCK_ROWS, KERNEL_CHUNK // 2
    c = codes.to(torch.uint8).reshape(n, k // KERNEL_CHUNK, 2, half)
    chunk_bytes = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(nb, INT4_BLOCK_ROWS, k // KERNEL_CHUNK, half)

    def param_bytes(p: torch.Tensor, c0: int, nc: int) -> torch.Tensor:  # rows 0-3, 2nc fp16 each
        return p[:, 2 * c0:2 * (c0 + nc)].to(torch.float16).contiguous().view(torch.uint8).reshape(nb, -1)

    parts = []
    for c0, nc in _int4_segments(k):
        parts += [param_bytes(scale, c0, nc), param_bytes(lo, c0, nc),
                  chunk_bytes[:, :, c0:c0 + nc].transpose(1, 2).reshape(nb, nc * INT4_BLOCK_ROWS * half)]
    return torch.cat(parts, dim=1)


def unpack_int4_blocks(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_int4_blocks' inverse: (codes [N, K] uint8, scale [N, K/32] fp16, min [N, K/32] fp16)."""
    nb, nbytes = packed.shape
    n, k, half = nb * INT4_BLOCK_ROWS, nbytes // INT4_BLOCK_CHUNK_BYTES * KERNEL_CHUNK, KERNEL_CHUNK // 2
    codes, scales, mins, off = [], [], [], 0

    def take(size: int) -> torch.Tensor:
        nonlocal off
        off += size
        return packed[:, off - size:off]

    for _c0, nc in _int4_segments(k):
        for dst in (scales, mins):
            dst.append(take(4 * nc * INT4_BLOCK_ROWS).contiguous().view(torch.float16).reshape(n, 2 * nc))
        b = take(128 * nc).reshape(nb, nc, INT4_BLOCK_ROWS, half).transpose(1, 2)
        codes.append(torch.stack([b & 0xF, b >> 4], dim=3).reshape(n, nc * KERNEL_CHUNK))
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1), torch.cat(mins, dim=1)


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Twin of cpu_quant_gemv.cpp int4_linear: sum over groups of d * d_x * (codes . v_x) + min * sum(x)."""
    q, dx, sx = quantize_activations_int8_ref(x)
    codes, scale, lo = unpack_int4_blocks(packed)
    n = codes.shape[0]
    codes = codes.reshape(n, -1, ACT_GROUP).double()
    dots = torch.einsum("mgk,ngk->mng", q.double(), codes)
    y = (dots * scale.double()[None] * dx.double()[:, None]).sum(-1) + sx.double() @ lo.double().t()
    return y.to(x.dtype)


def int4_dequantize_ref(packed: torch.Tensor) -> torch.Tensor:
    """Twin of cpu_quant_gemv.cpp int4_dequantize: codes * scale + min in fp32, rounded to bf16."""
    codes, scale, lo = unpack_int4_blocks(packed)
    n, k = codes.shape
    w = codes.reshape(n, k // ACT_GROUP, ACT_GROUP).float() * scale.float()[..., None] + lo.float()[..., None]
    return w.reshape(n, k).to(CPU_COMPUTE_DTYPE)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Twin of cpu_quant_gemv.cpp int8_linear: scale * sum over groups of d_x * (w . v_x)."""
    q, dx, _ = quantize_activations_int8_ref(x)
    n = qweight.shape[0]
    dots = torch.einsum("mgk,ngk->mng", q.double(), qweight.double().reshape(n, -1, ACT_GROUP))
    return ((dots * dx.double()[:, None]).sum(-1) * scales.double()).to(x.dtype)


def _kernels_take(k: int, wanted: bool | None) -> bool:
    """Whether a layer's few-row GEMMs go to the C++ kernels: K in whole chunks, and the kernels
    built (wanted None) or asked for (tests force either)."""
    return k % KERNEL_CHUNK == 0 and (cpu_ops() is not None if wanted is None else wanted)


class _CpuQuantLinear(nn.Module):
    """Shared forward: packed kernel for few rows, dequantized dense GEMM for many, in bf16."""

    dense_min_rows: int = 16

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.clone())

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == CPU_COMPUTE_DTYPE and x.dim() == 2 and x.shape[0] < self.dense_min_rows
                and self._buffers["bias"] is None):
            return self.packed_mm(x)  # a bf16 decode step: no reshapes or casts (~1 us each, x4 per layer)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(CPU_COMPUTE_DTYPE)
        y = self.packed_mm(x2) if x2.shape[0] < self.dense_min_rows else F.linear(x2, self.dequantized())
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(_CpuQuantLinear):
    def __init__(self, linear: Linear, empty: bool = False, use_kernel: bool | None = None) -> None:
        """empty: buffers left unfilled, for `load_rows` (quantize while loading, quantized_load.py).
        use_kernel: None = the C++ kernel where it is built and takes K (tests force either)."""
        super().__init__(linear)
        n, k = self.out_features, self.in_features
        self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(n, dtype=CPU_COMPUTE_DTYPE))
        self.use_kernel = _kernels_take(k, use_kernel)
        if not empty:
            self.load_rows(0, linear.weight.data)

    def load_rows(self, row: int, w) -> None:
        """Quantize output rows [row, row + len(w)) from float weights (or anything with materialize())."""
        q, scale = quantize_int8_per_channel(_tensor(w))
        self.qweight[row:row + q.shape[0]] = q
        self.scales[row:row + q.shape[0]] = scale.to(CPU_COMPUTE_DTYPE)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # not self.qweight: nn.Module.__getattr__ is ~0.3 us a lookup on the decode path
        if self.use_kernel:
            return cpu_ops().int8_linear(x, b["qweight"], b["scales"])
        return _INT8_MM(x, b["qweight"], b["scales"])

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(CPU_COMPUTE_DTYPE) * self.scales[:, None]

    def extra_repr(self) -> str:
        kernel = "C++ kernel" if self.use_kernel else "aten"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {kernel}"


class Int4Linear(_CpuQuantLinear):
    """Storage: where the C++ kernels take the layer, their stream (pack_int4_blocks: codes with fp16
    scales and mins, GGUF Q4_1's own fp16 parameters, exactly); else torch's int4pack (codes
    [N/64, K, 32] bytes, bf16 [K/G, N, 2] scale and zero)."""

    dense_min_rows = 64

    def __init__(self, linear: Linear, group_size: int = INT4_GROUP_SIZE, empty: bool = False,
                 use_kernel: bool | None = None) -> None:
        """empty: buffers left unfilled, for `load_rows` (quantize while loading, quantized_load.py).
        use_kernel: None = the C++ kernels' format where they are built (tests force either)."""
        super().__init__(linear)
        self.group_size = group_size
        n, k = self.out_features, self.in_features
        self.use_kernel = group_size == ACT_GROUP and _kernels_take(k, use_kernel)
        if self.use_kernel:  # codes and fp16 scales / mins in one stream per 4 rows (pack_int4_blocks)
            self.register_buffer("qweight", torch.empty(n // INT4_BLOCK_ROWS, k // KERNEL_CHUNK * INT4_BLOCK_CHUNK_BYTES,
                                                        dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8))  # the aten kernel's packing
            # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale. Layout [K/G, N, 2].
            self.register_buffer("scales_and_zeros", torch.empty(k // group_size, n, 2, dtype=CPU_COMPUTE_DTYPE))
        if not empty:
            self.load_rows(0, linear.weight.data)

    def load_rows(self, row: int, w) -> None:
        """Fill output rows [row, row + len(w)); row and len(w) multiples of 64 (the int4pack's row
        blocks are independent, so shards pack one by one). A Q4_1Weight with our group size
        keeps its codes, scales and mins exactly; anything else is quantized here."""
        param_dtype = torch.float16 if self.use_kernel else torch.float32
        if isinstance(w, Q4_1Weight) and self.group_size == Q4_1_GROUP:
            q, scale, lo = w.codes.to(torch.int32), w.scale, w.min
        else:
            q, scale, lo = quantize_int4_groups(_tensor(w), self.group_size, param_dtype)
        n = q.shape[0]
        if row % INT4_PACK_BLOCK_N or n % INT4_PACK_BLOCK_N:
            raise ValueError(f"int4 rows must come in blocks of {INT4_PACK_BLOCK_N}, got rows {row}..{row + n}")
        if self.use_kernel:
            self.qweight[row // INT4_BLOCK_ROWS:(row + n) // INT4_BLOCK_ROWS] = pack_int4_blocks(q, scale, lo)
            return
        self.qweight[row:row + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros[:, row:row + n] = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1)

    @staticmethod
    def supports(linear: Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        return linear.in_features % group_size == 0 and linear.out_features % INT4_PACK_BLOCK_N == 0

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # as in Int8Linear.packed_mm
        if self.use_kernel:
            return cpu_ops().int4_linear(x, b["qweight"])
        return _INT4_MM(x, b["qweight"], self.group_size, b["scales_and_zeros"])

    def dequantized(self) -> torch.Tensor:
        if self.use_kernel:  # the C++ twin of int4_dequantize_ref (bit-identical)
            return cpu_ops().int4_dequantize(self.qweight)
        n, k, g, b = self.out_features, self.in_features, self.group_size, INT4_PACK_BLOCK_N
        packed = self.qweight.view(n // b, k, b // 2)
        # low nibble: row j of the block, high nibble: row j + 32 (the kernel's layout)
        codes = torch.cat([packed & 0xF, packed >> 4], dim=-1).transpose(1, 2).reshape(n, k // g, g)
        scale, zero = self.scales_and_zeros.unbind(-1)  # [K/G, N] each
        w = (codes.to(CPU_COMPUTE_DTYPE) - 8) * scale.t()[..., None] + zero.t()[..., None]
        return w.reshape(n, k)

    def extra_repr(self) -> str:
        kernel = "C++ kernel" if self.use_kernel else "aten int4pack"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}, {kernel}"


class Int8Embedding(nn.Module):
    """Embedding rows stored int8 with one scale per row; a lookup dequantizes only its rows."""

    def __init__(self, emb: VocabEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        q, scale = quantize_int8_per_channel(emb.weight.data)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale.to(dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        rows = self.qweight.index_select(0, ids).to(self.scales.dtype) * self.scales.index_select(0, ids)[:, None]
        return rows.reshape(*input_ids.shape, self.embedding_dim)


def _check_supported(model: nn.Module, method: str, device: torch.device) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; supported: {', '.join(QUANTIZATIONS)}")
    if method in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"--quantization {method} is the CPU weight-only path; on CUDA use --quantization fp8")
    if method == "fp8":
        from engine_core.layers.fp8_linear import check_fp8_supported
        check_fp8_supported(device)
    for m in model.modules():
        tp = getattr(m, "tp", None)
        if tp is not None and tp.world_size > 1:
            raise ValueError("--quantization is not supported together with tensor parallelism")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Swap the linear layers (and the embedding) of a loaded model for quantized ones, in place.
    The full-precision tensors are dropped as each layer is replaced (tied LM head/embedding: once
    both are replaced)."""
    _check_supported(model, method, device)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (Linear, VocabEmbedding))]
    for name, m in targets:
        if isinstance(m, VocabEmbedding):
            new = Int8Embedding(m, dtype)
        elif method == "fp8":
            if name.endswith("lm_head"):
                continue  # kept in the model dtype, as vLLM does: fp8 logits cost 1.8 % perplexity
            from engine_core.layers.fp8_linear import Fp8Linear
            new = Fp8Linear(m, dtype)
        elif method == "int4" and not name.endswith("lm_head") and Int4Linear.supports(m):
            new = Int4Linear(m)
        else:
            new = Int8Linear(m)
        replace_module(model, name, new)
    return model


def model_resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights), and
    of its oneDNN-packed weights."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    # oneDNN-packed weights (cpu_packed_linear.PackedLinear) are opaque tensors without a storage
    return total + sum(getattr(m, "packed_bytes", 0) for m in model.modules())
