"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral; also the base of Qwen2/Qwen3 in qwen.py).

Module names mirror HF checkpoints (model.layers.N.self_attn..., model.norm, lm_head) except the
fused projections: qkv_proj = [q_proj | k_proj | v_proj] and gate_up_proj = [gate_proj | up_proj],
which `load_weights` fills shard by shard (the vLLM / nano-vllm stacked-params mapping).

    hidden = model(input_ids [T], positions [T], kv_caches (one per layer), md)  -> [T, hidden]
    logits = model.compute_logits(hidden[rows])                                   -> [N, vocab] fp32

Tensor parallelism: pass `tp` (engine_core.distributed.TPGroup). Attention then holds this rank's
Q heads and the KV heads they use (qkv_proj column-parallel, o_proj row-parallel + all-reduce), the
MLP a slice of the intermediate dim (gate_up column-parallel, down row-parallel + all-reduce), the
embedding and LM head a vocab slice; norms and RoPE are replicated. `load_weights` is unchanged:
every parameter's weight_loader keeps only this rank's slice of the full checkpoint tensor.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from engine_core.distributed import TPGroup
from engine_core.kernels import cpu_ops as cpu_kernels
from engine_core.layers.activation import SiluAndMul
from engine_core.layers.attention import Attention
from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.layers.layernorm import RMSNorm
from engine_core.layers.linear import (
    LMHead,
    MergedLinear,
    QKVLinear,
    RowParallelLinear,
    VocabEmbedding,
    default_weight_loader,
)
from engine_core.layers.rotary import RotaryEmbedding, get_rope
from engine_core.model_config import ModelConfig
from engine_core.models import cpu_decode_layer

_EMPTY = torch.empty(0)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                  config.num_key_value_heads, bias=config.attention_bias, tp=tp)
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, bias=False, tp=tp)
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: RMSNorm over each head's channels, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(-1, self.kv_size)
        o = self.attn(q, k, v, kv_cache, md, rope=(self.rotary_emb, positions))
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False, tp=tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False, tp=tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if not hidden_states.is_cuda and cpu_decode_layer.eligible(md, hidden_states, kv_cache):
            ops = cpu_kernels.cpu_ops()  # CPU decode step: the same kernels without the modules' Python glue
            out = None if ops is None else cpu_decode_layer.decode_layer(self, ops, positions, hidden_states,
                                                                         residual, kv_cache, md)
            if out is not None:
                return out
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, md)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.rotary_emb = get_rope(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                   config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary_emb, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor] | None,
                md: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            kv_cache = kv_caches[i] if kv_caches else _EMPTY
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, md)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name fragment -> (our fused parameter fragment, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    # checkpoint entries that are not parameters of ours
    ignored_weight_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tp=tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor] | None,
                md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters (any device/dtype; copied in place).
        Returns the names of our parameters that were written."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(self.ignored_weight_suffixes):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            for hf_part, (our_part, shard_id) in self.packed_modules_mapping.items():
                if hf_part in name:
                    param_name = name.replace(hf_part, our_part)
                    param = params.get(param_name)
                    if param is None:
                        raise ValueError(f"checkpoint tensor {name!r} maps to unknown parameter {param_name!r}")
                    try:
                        param.weight_loader(param, tensor, shard_id)
                    except ValueError as e:
                        raise ValueError(f"{name}: {e}") from None
                    loaded.add(param_name)
                    break
            else:
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
                loader = getattr(param, "weight_loader", None)
                try:
                    if loader is None:
                        default_weight_loader(param, tensor)
                    else:
                        loader(param, tensor)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is the Llama architecture (its sliding window, where set, is capped by the engine)."""
