"""Architecture name (ModelConfig.architecture) -> model class."""
from __future__ import annotations

import importlib

from torch import nn

from engine_core.model_config import SUPPORTED_ARCHITECTURES

_MODELS: dict[str, tuple[str, str]] = {
    "llama": ("engine_core.models.llama", "LlamaForCausalLM"),
    "mistral": ("engine_core.models.llama", "MistralForCausalLM"),
    "qwen2": ("engine_core.models.qwen", "Qwen2ForCausalLM"),
    "qwen3": ("engine_core.models.qwen", "Qwen3ForCausalLM"),
}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(_MODELS)}")
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)


def supported_architectures() -> list[str]:
    return list(_MODELS)
