"""Model loading: resolve_model(MODEL) -> ModelSource, load_model(source, dtype, device) -> nn.Module."""
from engine_core.loader.load import load_model, resolve_device, resolve_dtype
from engine_core.loader.model_source import (
    ModelSource,
    embedded_gguf_path,
    resolve_model,
)

__all__ = ["ModelSource", "embedded_gguf_path", "load_model", "resolve_device", "resolve_dtype", "resolve_model"]
