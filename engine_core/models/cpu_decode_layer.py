"""CPU decode steps of a Llama-family decoder layer with its Python glue trimmed.

On a 2-core CPU a SmolLM2 decode step is ~6 ms of forward, and after the C++ kernels
(engine_core/kernels/cpu_decode_ops.cpp) the Python around them -- 11 nn.Module calls per layer,
generic shape/dtype/device checks, buffer lookups through nn.Module.__getattr__, reshapes -- was
~60 us of every layer, ~1.8 ms a token. `decode_layer` runs the same kernels in the same order as
the modules' forwards, as one straight line of calls: submodules, weights and buffers are read from
the modules' own dicts on every call (nothing is cached, so a replaced or reloaded submodule is
simply used), and the projections' forwards are called without nn.Module.__call__.

With int4 / int8 weights on the C++ GEMMs (kernels/cpu_quant_gemv.cpp) the whole layer is one C++
call (kernels/cpu_decode_ops.cpp llama_decode_layer: the same kernels in the same order), which
also drops the ~8 Python->C++ calls of a layer.

Same arithmetic as the module path (the same kernels on the same tensors; the tests compare the
two bit for bit). Eligible: a CPU step of decode rows only, the C++ kernels built, a KV cache in the
compute dtype, no q/k norm (Qwen3), and projections that are plain, oneDNN-packed, int8 or int4 linears without
bias (Qwen2's q/k/v bias) or tensor parallelism. `decode_layer` returns None for anything else,
before it has touched a tensor, and the caller runs the modules.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from engine_core.layers.attention import decode_row_tables, rows_attention_cpu_kernel
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.layers.cpu_packed_linear import PackedLinear
from engine_core.layers.linear import Linear, RowParallelLinear
from engine_core.layers.quantization import CPU_COMPUTE_DTYPE, Int4Linear, Int8Linear
from engine_core.layers.rotary import cpu_rotary_indices


def _supported(mod: nn.Module) -> bool:
    """A projection whose forward, on 2-D decode rows, is one kernel call (called as `mod.forward`:
    the forward without nn.Module.__call__)."""
    if mod._buffers.get("bias") is not None or mod._parameters.get("bias") is not None:
        return False
    if isinstance(mod, (Int4Linear, Int8Linear, PackedLinear)):
        return True
    tp = mod.__dict__.get("tp")
    if tp is not None and tp.world_size != 1:
        return False
    return isinstance(mod, Linear) and (type(mod).forward is Linear.forward or isinstance(mod, RowParallelLinear))


def _quantized_weights(mod: nn.Module) -> list[torch.Tensor] | None:
    """A projection's weights as kernels/cpu_decode_ops.cpp llama_decode_layer takes them (int4
    {packed}, int8 {qweight, scales}, on the C++ integer-dot GEMMs, no bias), else None."""
    if not mod.__dict__.get("use_kernel") or mod._buffers.get("bias") is not None:
        return None
    b = mod._buffers
    if type(mod) is Int4Linear:
        return [b["qweight"]]
    if type(mod) is Int8Linear:
        return [b["qweight"], b["scales"]]
    return None


def eligible(md: AttentionMetadata, hidden: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """A CPU step of decode rows only, hidden [T, H] in the KV cache's dtype."""
    return (md.num_decodes == md.num_reqs == hidden.shape[0] and hidden.dim() == 2 and hidden.device.type == "cpu"
            and kv_cache.numel() > 0 and kv_cache.dtype == hidden.dtype)


def decode_layer(layer: nn.Module, ops: ModuleType, positions: torch.Tensor, hidden: torch.Tensor,
                 residual: torch.Tensor | None, kv_cache: torch.Tensor, md: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LlamaDecoderLayer.forward for an `eligible` step: the same kernels in the same order. None
    (nothing done) when the layer has a part this path does not run."""
    mods = layer._modules
    attn, mlp = mods["self_attn"], mods["mlp"]
    am, mm = attn._modules, mlp._modules
    qkv_p, o_p, gu_p, down_p = am["qkv_proj"], am["o_proj"], mm["gate_up_proj"], mm["down_proj"]
    ln1, ln2 = mods["input_layernorm"], mods["post_attention_layernorm"]
    if (attn.qk_norm or ln1._parameters["weight"].dtype != hidden.dtype
            or ln2._parameters["weight"].dtype != hidden.dtype
            or not (_supported(qkv_p) and _supported(o_p) and _supported(gu_p) and _supported(down_p))):
        return None
    core = am["attn"]
    weights = [_quantized_weights(p) for p in (qkv_p, o_p, gu_p, down_p)]
    # int4 / int8 weights, bf16 activations (the layers' compute dtype: an fp32 model's projections
    # round their inputs to bf16 first): the whole layer in one C++ call
    if None not in weights and hidden.dtype == CPU_COMPUTE_DTYPE and ln1.eps == ln2.eps:
        positions, slots = cpu_rotary_indices(positions, md.slot_mapping)
        block_tables, lens = decode_row_tables(md, md.num_reqs)
        return ops.llama_decode_layer(hidden, residual, ln1._parameters["weight"], ln2._parameters["weight"],
                                      ln1.eps, *weights, core.num_heads, attn.num_kv_heads,
                                      core.head_dim, positions, am["rotary_emb"]._cache_on(positions.device),
                                      kv_cache, slots, block_tables, lens, core.scale)
    if residual is None:
        residual = hidden
        h = ops.rms_norm(hidden, ln1._parameters["weight"], ln1.eps)
    else:
        ops.fused_add_rms_norm_(hidden, residual, ln1._parameters["weight"], ln1.eps)
        h = hidden
    qkv = qkv_p.forward(h)
    qs, kvs = attn.q_size, attn.kv_size
    q, k, v = qkv[:, :qs], qkv[:, qs:qs + kvs], qkv[:, qs + kvs:qs + 2 * kvs]
    am["rotary_emb"].rotate_and_cache(positions, q, k, v, kv_cache, md.slot_mapping)
    o = rows_attention_cpu_kernel(q.view(-1, core.num_heads, core.head_dim), kv_cache, md, md.num_reqs, core.scale)
    h = o_p.forward(o.view(o.shape[0], -1))
    ops.fused_add_rms_norm_(h, residual, ln2._parameters["weight"], ln2.eps)
    return down_p.forward(ops.silu_and_mul(gu_p.forward(h))), residual
