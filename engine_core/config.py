"""One configuration object for the engine, validated up front. CLI flags map 1:1 onto its fields
with vLLM's names (`--max-model-len` -> max_model_len, ...); see `add_cli_args`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from engine_core.spec_decode.config import SpeculativeConfig

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")
_QUANTIZATIONS = (None, "int8", "int4", "fp8")
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
_SCHEDULING_POLICIES = ("fcfs", "priority")


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
    max_num_batched_tokens: int | None = field(default=None, metadata={"help": (
        "token budget of one step. Default with chunked prefill: 2048 on GPU; on CPU 64 per available "
        "core (a power of two, 128 on 2 cores) so a step stays near 250 ms and a long prompt cannot "
        "stall the other streams. Without chunked prefill: max_model_len")})
    long_prefill_token_threshold: int | None = field(default=None, metadata={"help": (
        "largest prefill chunk one request gets while other requests wait, so a short request "
        "behind a long prompt is admitted in the next step. Default: 3/4 of the step budget; 0: no cap")})
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: str = field(default="fcfs", metadata={"choices": _SCHEDULING_POLICIES, "help": (
        "fcfs: first come, first served (a request's priority must be 0). priority: the waiting queue is "
        "ordered by (priority, arrival), lower values first, and a waiting request preempts running ones "
        "of a lower priority when it finds no sequence slot or KV blocks (docs/scheduling.md)")})
    request_timeout: float = field(default=0.0, metadata={"help": (
        "seconds (queue time included) after which an unfinished request is aborted with the tokens "
        "it has, unless the request sets its own timeout; 0: no timeout (docs/scheduling.md)")})
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
    quantization: str | None = field(default=None, metadata={"help": (
        "quantized linear layers. CPU, weight-only: int8 (per-channel scales) or int4 (groups of 32 "
        "with scale and min: a GGUF Q4_1 tensor keeps its exact codes). CUDA with compute capability "
        ">= 8.9: fp8 (e4m3 weights with per-channel scales; decode rows run a weight-only kernel, "
        "prefill rows quantize activations per token for torch._scaled_mm; the LM head stays in the "
        "model dtype). The embedding is kept as int8 rows. Default: none (the dtype's weights)")})
    kv_cache_dtype: str = field(default="auto", metadata={"help": (
        "KV cache storage. auto: the model dtype. fp8 (= fp8_e4m3): one byte per element, twice the "
        "tokens in the same memory; K/V are rounded to e4m3 with scale 1.0 (values beyond +-448 "
        "saturate; vLLM's default scaling) and widened again inside the attention kernels")})
    cpu_threads: int | None = field(default=None, metadata={"help": (
        "intra-op threads on CPU. Default: the cores this process may use (its affinity mask, capped "
        "by the cgroup cpu.max quota), not the host's core count")})
    max_logprobs: int = 20
    speculative_config: str | dict | SpeculativeConfig | None = field(default=None, metadata={"help": (
        "speculative decoding, vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 1}' (prompt lookup) or '{\"method\": "
        "\"draft_model\", \"model\": M, \"num_speculative_tokens\": 4}' (a small model with the same "
        "vocabulary). Requests with logprobs or structured output are not speculated. Default: off")})
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
        if self.quantization in ("", "none"):
            self.quantization = None
        if self.quantization not in _QUANTIZATIONS:
            bad("quantization", "must be one of int8, int4, fp8 (or none)")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 0:
            bad("long_prefill_token_threshold", "must be >= 0")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"must be one of {_KV_CACHE_DTYPES}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            bad("cpu_threads", "must be >= 1")
        if self.scheduling_policy not in _SCHEDULING_POLICIES:
            bad("scheduling_policy", f"must be one of {_SCHEDULING_POLICIES}")
        if not 0.0 <= self.request_timeout < float("inf"):  # also rejects NaN
            bad("request_timeout", "must be a finite number of seconds >= 0 (0: no timeout)")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.speculative_config is not None and self.tensor_parallel_size > 1:
            raise ValueError("speculative_config is not supported with tensor_parallel_size > 1")

    def resolve_admission_delay(self, executor_device: str) -> int:
        if self.max_admission_delay_steps is not None:
            return self.max_admission_delay_steps
        return 4 if executor_device.startswith("cuda") and not self.enforce_eager else 0

    def resolve_limits(self, model_context_len: int, device: str = "cuda") -> None:
        """Fill defaults that depend on the model and the device; reject limits the model cannot honour."""
        if self.max_model_len is None:
            self.max_model_len = min(model_context_len, 8192)
        elif self.max_model_len > model_context_len:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context length {model_context_len}")
        if self.max_num_batched_tokens is None:
            if not self.enable_chunked_prefill:
                self.max_num_batched_tokens = self.max_model_len
            elif str(device).startswith("cpu"):
                from engine_core.cpu_resources import (
                    available_cpus,
                    cpu_step_token_budget,
                )
                self.max_num_batched_tokens = cpu_step_token_budget(self.cpu_threads or available_cpus())
            else:
                self.max_num_batched_tokens = 2048
        if self.long_prefill_token_threshold is None:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens * 3 // 4)
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
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=f.metadata.get("help"))
            else:
                kind = {"int": int, "float": float}.get(
                    str(f.type).replace(" | None", ""), str)
                parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f.metadata.get("help"),
                                    choices=f.metadata.get("choices"))
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, model: str | None = None) -> EngineConfig:
        kwargs = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if model is not None:
            kwargs["model"] = model
        return cls(**kwargs)
