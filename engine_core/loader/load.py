"""load_model(source, dtype, device): build the model directly on the target device/dtype (layers
allocate uninitialised parameters under `with torch.device(device)` and a temporary default dtype,
so nothing is materialised twice), then fill the parameters from GGUF / safetensors / random."""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from torch import nn

from engine_core.distributed import TPGroup, check_tensor_parallel
from engine_core.layers.cpu_packed_linear import PACKED_DTYPES, pack_cpu_linears
from engine_core.loader.dummy_loader import init_dummy_weights
from engine_core.loader.gguf_loader import iter_gguf_weights
from engine_core.loader.model_source import ModelSource, resolve_model
from engine_core.loader.safetensors_loader import iter_safetensors_weights
from engine_core.models.registry import get_model_class

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: torch.device | str | None) -> torch.device:
    """auto: CUDA when present, else CPU. A CUDA device always gets an explicit index (memory
    queries such as torch.cuda.mem_get_info reject a bare "cuda")."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 on GPU, float32 on CPU (DESIGN.md section 4)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: auto -> the model dtype; fp8 / fp8_e4m3 -> float8_e4m3fn."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"unsupported kv_cache_dtype {kv_cache_dtype!r}; supported: auto, fp8, fp8_e4m3")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(source: ModelSource | str | os.PathLike | None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, seed: int = 0, tp: TPGroup | None = None,
               quantization: str | None = None) -> nn.Module:
    """Instantiate and fill the model for `source` (a ModelSource or anything resolve_model takes).
    Returns it in eval mode on `device` in `dtype`. With `tp` (world_size > 1) this rank's shard:
    every weight_loader keeps its slice; safetensors are read lazily, slice by slice.
    `quantization` (int8 | int4 | fp8): linear layers swapped for quantized ones after loading."""
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = source.config
    model_cls = get_model_class(config.architecture)
    sharded = tp is not None and tp.world_size > 1
    if sharded:
        check_tensor_parallel(config, tp.world_size)
    t0 = time.perf_counter()
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(config, tp=tp) if sharded else model_cls(config)

    if source.kind == "dummy":
        init_dummy_weights(model, seed=seed)
    else:
        # int8/int4 on the CPU: quantize each tensor as it is read (the float linear weights are
        # never materialised; Q4_1 GGUF tensors keep their codes), see quantized_load.py.
        at_load = quantization in ("int8", "int4") and device.type == "cpu" and not sharded
        if at_load:
            from engine_core.layers import quantized_load
            quantized_load.prepare(model, quantization)
        # A pre-quantized fp8 checkpoint (engine_core.tools.quantize_fp8): its e4m3 weights and
        # scales go into Fp8Linear layers as stored, not re-quantized.
        from engine_core.loader import fp8_checkpoint
        prequantized = source.kind == "hf" and fp8_checkpoint.is_fp8_checkpoint(source.path)
        if prequantized:
            if quantization != "fp8":
                raise ValueError(f"{source.path} is an fp8 checkpoint: serve it with --quantization fp8")
            if sharded:
                raise ValueError("--quantization is not supported together with tensor parallelism")
            fp8_checkpoint.prepare(model, dtype)
        if source.kind == "gguf":
            weights = iter_gguf_weights(source.path, config, keep_q4_1=at_load and quantization == "int4")
        elif source.kind == "hf":
            weights = iter_safetensors_weights(source.path, device, lazy=sharded)
        else:
            raise ValueError(f"unknown model source kind {source.kind!r}")
        loaded = model.load_weights(weights)
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            raise ValueError(f"{source.path}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:5]}")
        if at_load:
            quantized_load.finish(model)
        if prequantized:
            fp8_checkpoint.finish(model)
    if quantization:
        from engine_core.layers.quantization import quantize_model
        quantize_model(model, quantization, device, dtype)
    if device.type == "cpu" and dtype in PACKED_DTYPES and not sharded:
        pack_cpu_linears(model)  # oneDNN's blocked weight layout once, not on every GEMM
    model.eval()
    logger.info("loaded %s (%s, %s) on %s as %s%s in %.2fs%s", source.name, source.kind, config.architecture,
                device, dtype, f", {quantization} weights" if quantization else "", time.perf_counter() - t0,
                f" (tensor-parallel rank {tp.rank} of {tp.world_size})" if sharded else "")
    return model
