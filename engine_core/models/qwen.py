"""Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm before RoPE, no bias).

Both are the Llama decoder with those two switches, which ModelConfig sets from the architecture
(attention_bias for qwen2, qk_norm for qwen3), so the classes only name the architecture.
"""
from __future__ import annotations

from engine_core.distributed import TPGroup
from engine_core.model_config import ModelConfig
from engine_core.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        if not config.attention_bias:
            raise ValueError("Qwen2 needs attention_bias=True (q/k/v projections have bias)")
        super().__init__(config, tp)


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        if not config.qk_norm:
            raise ValueError("Qwen3 needs qk_norm=True (per-head q/k RMSNorm)")
        super().__init__(config, tp)
