"""In-process executor: loads the model, sizes and allocates the KV cache, runs steps.

With a `tp` (TPGroup, world_size > 1) it is one tensor-parallel rank inside a MultiprocExecutor
worker: it loads only its shard, caches only its KV heads, and agrees on the KV block count with
the other ranks (the minimum), so one block table is valid on every rank."""
from __future__ import annotations

import logging

import torch

from engine_core.config import EngineConfig
from engine_core.cpu_resources import (
    configure_cpu_threads,
    cpu_capabilities,
    openmp_wait_policy,
)
from engine_core.distributed import TPGroup, attention_shard, check_tensor_parallel
from engine_core.executor.base import Executor, ExecutorInfo
from engine_core.executor.model_runner import ModelRunner
from engine_core.kernels.cpu_ops import cpu_ops_status
from engine_core.layers.quantization import model_resident_bytes
from engine_core.loader import load_model
from engine_core.loader.load import (
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from engine_core.loader.model_source import resolve_model
from engine_core.model_config import ModelConfig
from engine_core.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_GB = 1.0


def model_spec(config: EngineConfig) -> str | None:
    """The MODEL argument to resolve, honouring --load-format dummy."""
    model = config.model
    if config.load_format == "dummy" and not str(model).startswith("dummy:"):
        model = f"dummy:{model}"  # random weights from the model's config (GPU speed work)
    return model


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig, tp: TPGroup | None = None) -> None:
        if tp is None and config.tensor_parallel_size > 1:
            raise ValueError(f"LocalExecutor runs on one device; tensor_parallel_size="
                             f"{config.tensor_parallel_size} needs MultiprocExecutor (engine_core.executor.make_executor)")
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.tp = tp if tp is not None else TPGroup(device=self.device)
        self.source = resolve_model(model_spec(config))
        mc = self.source.config
        check_tensor_parallel(mc, self.tp.world_size)
        self.num_kv_heads = attention_shard(mc.num_attention_heads, mc.num_key_value_heads,
                                            self.tp.world_size, self.tp.rank).num_kv_heads
        config.resolve_limits(mc.max_model_len_limit, self.device.type)  # sliding windows: capped (not implemented)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif self.tp.world_size == 1:  # a tensor-parallel worker's threads are set by its parent
            threads = configure_cpu_threads(config.cpu_threads)
            caps = cpu_capabilities()
            logger.info("CPU: %d threads (%d cores available), ISA %s, native bf16: %s, OpenMP wait policy %s",
                        threads, caps.num_cpus, caps.isa, caps.native_bf16,
                        openmp_wait_policy() or "libgomp default (spin)")
            logger.info("CPU: %s", cpu_ops_status())  # built by `make setup`, else here (~30 s, once)
        torch.manual_seed(config.seed)
        self.model = load_model(self.source, dtype=self.dtype, device=self.device, tp=self.tp,
                                quantization=config.quantization)
        self.weight_bytes = model_resident_bytes(self.model)
        self.model.eval()
        self.draft_model, self.draft_config = self._load_draft_model(mc)
        self.num_blocks = self.tp.min_int(self._num_kv_blocks())  # every rank: the same block count
        capacity = (self.num_blocks - 1) * config.block_size
        if capacity < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.num_blocks - 1} blocks of {config.block_size}), "
                f"less than max_model_len={config.max_model_len}; raise the KV budget or lower max_model_len")
        self.runner = ModelRunner(self.model, mc, device=self.device, dtype=self.dtype,
                                  block_size=config.block_size, num_blocks=self.num_blocks, seed=config.seed,
                                  cuda_graphs=not config.enforce_eager, max_num_seqs=config.max_num_seqs,
                                  max_model_len=config.max_model_len, num_kv_heads=self.num_kv_heads,
                                  kv_dtype=self.kv_dtype, speculative_config=config.speculative_config,
                                  draft_model=self.draft_model, draft_model_config=self.draft_config)
        if self.tp.is_driver:
            logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB%s); max concurrency at "
                        "max_model_len=%d: %.1fx", self.num_blocks, config.block_size, capacity,
                        self.num_blocks * self._block_bytes() / 2**30,
                        f" per rank, {self.tp.world_size} ranks" if self.tp.world_size > 1 else "",
                        config.max_model_len, capacity / config.max_model_len)
            logger.info("resident memory: weights %.1f MiB (%s%s) + KV cache %.1f MiB; step budget %d tokens",
                        self.weight_bytes / 2**20, str(self.dtype).removeprefix("torch."),
                        f", {config.quantization}" if config.quantization else "",
                        self.num_blocks * self._block_bytes() / 2**20, config.max_num_batched_tokens)

    def _load_draft_model(self, target: ModelConfig):
        """The draft model of speculative_config (method draft_model): same vocabulary as the target
        (its tokens are verified by id), loaded next to the target, KV cache alongside (ModelRunner)."""
        spec = self.config.speculative_config
        if spec is None or spec.method != "draft_model":
            return None, None
        source = resolve_model(spec.model)
        dc = source.config
        if dc.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config.model {spec.model!r} has vocab_size {dc.vocab_size}, the target "
                             f"{target.vocab_size}: a draft model must share the target's vocabulary")
        if dc.max_model_len_limit < self.config.max_model_len:
            raise ValueError(f"speculative_config.model {spec.model!r} has a context of {dc.max_model_len_limit} "
                             f"tokens, less than max_model_len={self.config.max_model_len}")
        model = load_model(source, dtype=self.dtype, device=self.device, tp=self.tp,
                           quantization=self.config.quantization)
        self.weight_bytes += model_resident_bytes(model)
        logger.info("speculative decoding: draft model %s (%d layers), k=%d", source.name,
                    dc.num_hidden_layers, spec.num_speculative_tokens)
        return model.eval(), dc

    def _block_bytes(self) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.source.config, self.config.block_size, self.kv_dtype,
                                                   self.num_kv_heads)
        if self.draft_config is not None:  # the draft's KV cache has the same blocks
            per_block += ModelRunner.kv_bytes_per_block(self.draft_config, self.config.block_size, self.kv_dtype)
        return per_block

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        if cfg.kv_cache_memory_gb is not None or self.device.type != "cuda":
            budget = (cfg.kv_cache_memory_gb or CPU_DEFAULT_KV_GB) * 2**30
            return max(2, int(budget // self._block_bytes()))
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """vLLM-style: run a forward at max_num_batched_tokens without KV cache to measure peak
        activation memory, then give gpu_memory_utilization x total - peak to the KV cache."""
        from engine_core.executor.profiling import profile_peak_memory

        peak = profile_peak_memory(self.model, self.source.config, self.config, self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_for_kv = self.config.gpu_memory_utilization * total - peak
        if free_for_kv <= 0:
            raise ValueError(f"no GPU memory left for the KV cache: peak usage {peak / 2**30:.2f} GiB, "
                             f"budget {self.config.gpu_memory_utilization * total / 2**30:.2f} GiB")
        return int(free_for_kv // self._block_bytes())

    def describe(self) -> ExecutorInfo:
        mc = self.source.config
        return ExecutorInfo(
            model_name=self.source.name,
            architecture=mc.architecture,
            vocab_size=mc.vocab_size,
            max_model_len=self.config.max_model_len,
            num_kv_blocks=self.num_blocks,
            block_size=self.config.block_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            num_layers=mc.num_hidden_layers,
            num_kv_heads=self.num_kv_heads,  # cached on this device (this rank's share under TP)
            head_dim=mc.head_dim,
            kv_cache_bytes=self.num_blocks * self._block_bytes(),
            eos_token_ids=list(mc.eos_token_ids),
            num_speculative_tokens=spec.num_speculative_tokens if (spec := self.config.speculative_config) else 0,
            num_lookahead_slots=spec.num_lookahead_slots if spec else 0,
        )

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    @property
    def max_concurrent_batches(self) -> int:
        return 2  # on CPU too: the runner keeps one step unmaterialized, so the async path is tested

    def submit(self, scheduler_output: SchedulerOutput) -> None:
        self.runner.submit(scheduler_output)

    def get_result(self) -> ModelRunnerOutput:
        return self.runner.get_result()

    @property
    def supports_deferred_bitmasks(self) -> bool:
        return True

    def provide_bitmasks(self, step_id: int, bitmasks: dict) -> None:
        self.runner.provide_bitmasks(step_id, bitmasks)

    def abandon_in_flight(self) -> None:
        self.runner.abandon_in_flight()

    def reset(self) -> None:
        self.runner.reset()

    def shutdown(self) -> None:
        self.runner.reset()
