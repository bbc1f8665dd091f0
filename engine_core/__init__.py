"""pagedserve's engine: `from engine_core import LLM, SamplingParams, RequestOutput` (as in vLLM).

The names resolve lazily (PEP 562): `LLM` pulls in torch and the model code, which light imports
such as `engine_core.sampling_params` (the gateway, the gRPC services) must not pay for.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine_core.llm import LLM
    from engine_core.outputs import RequestOutput
    from engine_core.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]

_SOURCES = {"LLM": "engine_core.llm", "RequestOutput": "engine_core.outputs",
            "SamplingParams": "engine_core.sampling_params"}


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
