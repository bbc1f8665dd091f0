"""One configuration object for the engine, validated up front. CLI flags map 1:1 onto its fields
with vLLM's names (`--max-model-len` -> max_model_len, ...); see `add_cli_args`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig:
    model: str | None = None  # None / "default": the embedded SmolLM2 GGUF
    tokenizer: str | None = None  # defaults to the model
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    load_format: str = "auto"  # auto | gguf | safetensors | dummy
    seed: int = 0
    # Scheduling.
    block_size: int = 16
    max_model_len: int | None = None  # None: min(model's context, 8192)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 with chunked prefill, else max_model_len
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # KV cache sizing: on GPU a fraction of device memory (profiled); on CPU an explicit budget.
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float | None = None  # explicit KV budget (CPU default 1 GiB)
    num_gpu_blocks_override: int | None = None  # exact number of KV blocks (tests force preemption)
    enforce_eager: bool = False
    # Schedule and send step N+1 while step N runs (DESIGN.md §2); stop conditions apply one step
    # late (a finished request's surplus token is discarded).
    async_scheduling: bool = True
    # While requests decode, new ones may wait up to this many steps to be admitted together, so
    # that most steps stay pure-decode CUDA-graph replays (Scheduler._admit_now). None: 4 on CUDA
    # (graphs), 0 on CPU or with --enforce-eager (every step is eager anyway).
    max_admission_delay_steps: int | None = None
    tensor_parallel_size: int = 1
    max_logprobs: int = 20
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.dtype not in _DTYPES:
            bad("dtype", f"must be one of {_DTYPES}")
        if self.device not in _DEVICES and not str(self.device).startswith("cuda:"):
            bad("device", f"must be one of {_DEVICES} or cuda:N")
        if self.load_format not in ("auto", "gguf", "safetensors", "dummy"):
            bad("load_format", "must be auto, gguf, safetensors or dummy")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            bad("block_size", "must be a power of two in [1, 128]")
        if self.max_model_len is not None and self.max_model_len < 1:
            bad("max_model_len", "must be >= 1")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", "must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            bad("kv_cache_memory_gb", "must be > 0")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            bad("num_gpu_blocks_override", "must be >= 2 (block 0 is reserved)")
        if self.max_admission_delay_steps is not None and self.max_admission_delay_steps < 0:
            bad("max_admission_delay_steps", "must be >= 0")
        if self.tensor_parallel_size < 1:
            bad("tensor_parallel_size", "must be >= 1")

    def resolve_admission_delay(self, executor_device: str) -> int:
        if self.max_admission_delay_steps is not None:
            return self.max_admission_delay_steps
        return 4 if executor_device.startswith("cuda") and not self.enforce_eager else 0

    def resolve_limits(self, model_context_len: int) -> None:
        """Fill defaults that depend on the model; reject limits the model cannot honour."""
        if self.max_model_len is None:
            self.max_model_len = min(model_context_len, 8192)
        elif self.max_model_len > model_context_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context length {model_context_len}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 2048 if self.enable_chunked_prefill else self.max_model_len
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """vLLM-style flags: every field except `extra`, --snake-case -> --kebab-case."""
        bool_flags = {"enable_chunked_prefill", "enable_prefix_caching", "enforce_eager", "async_scheduling"}
        for f in fields(EngineConfig):
            if f.name in ("model", "extra"):
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name in bool_flags:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
            else:
                kind = {"int": int, "float": float}.get(
                    str(f.type).replace(" | None", ""), str)
                parser.add_argument(flag, dest=f.name, type=kind, default=f.default)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, model: str | None = None) -> EngineConfig:
        kwargs = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if model is not None:
            kwargs["model"] = model
        return cls(**kwargs)
