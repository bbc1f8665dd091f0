"""What the CPU we run on can do: cores actually available (cgroup quota and affinity), ISA
features, and the defaults derived from them (intra-op threads, a step's token budget).

Containers routinely see every host core in os.cpu_count() while their cgroup grants two; torch's
default thread count then oversubscribes the quota and every op waits on descheduled threads. So
the engine sizes its thread pool from min(affinity, ceil(cgroup cpu.max quota / period)).
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import lru_cache

# Prefill work per step on CPU: about 32 tokens per core keeps a step of a ~100M-parameter fp32
# model near 250 ms (measured: SmolLM2-135M prefills ~150-250 tok/s per 2 cores), so a long prompt
# is cut into chunks and streams already decoding keep getting a token every step or two.
CPU_TOKENS_PER_CORE_PER_STEP = 32
CPU_MIN_STEP_TOKENS = 32
CPU_MAX_STEP_TOKENS = 2048
# OpenMP workers that spin between parallel regions (libgomp's default: ~300k spins before they
# sleep) take the core away from the thread that still has work whenever anything else runs on it
# (other jobs, our own gateway / detokenizer threads): on a shared 2-core box every small op then
# waits for a descheduled worker. Measured there (load average 6-7, SmolLM2 int4, 2 threads):
# decode 1.3 tok/s with the default, 3-4 with GOMP_SPINCOUNT=30000, 10-15 with 3000, 21-29 with
# PASSIVE (sleep at once). llama.cpp's OpenMP pool moved the same way in the same process.
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 cpu.max, else v1 cfs quota/period); None: no limit."""
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota = _read(os.path.join(root, "cpu", "cpu.cfs_quota_us")) or _read(os.path.join(root, "cpu.cfs_quota_us"))
    period = _read(os.path.join(root, "cpu", "cpu.cfs_period_us")) or _read(os.path.join(root, "cpu.cfs_period_us"))
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may really use: its affinity mask, capped by the cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """ISA flags of this CPU (/proc/cpuinfo), e.g. avx2, avx512f, avx512_bf16, amx_bf16."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@dataclass(frozen=True)
class CpuCapabilities:
    num_cpus: int
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AMX tiles or AVX512-BF16 dot products); without either,
        bf16 is emulated through fp32 and is slower than fp32 for prefill."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def isa(self) -> str:
        for name, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")):
            if flag in self.flags:
                return name
        return "baseline"


def cpu_capabilities() -> CpuCapabilities:
    return CpuCapabilities(available_cpus(), cpu_flags())


def set_openmp_wait_policy(environ: MutableMapping[str, str] | None = None,
                           torch_imported: bool | None = None) -> str | None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose one (ACTIVE suits a dedicated, idle box).
    libgomp reads it once, when torch is imported, so this only takes effect before that: call it
    first thing in an entry point. Returns the policy in effect (None: torch's default spinning)."""
    env = os.environ if environ is None else environ
    if torch_imported is None:
        torch_imported = "torch" in sys.modules
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env and not torch_imported:
        env["OMP_WAIT_POLICY"] = DEFAULT_OMP_WAIT_POLICY
    return env.get("OMP_WAIT_POLICY") or (f"GOMP_SPINCOUNT={env['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in env else None)


def cpu_step_token_budget(num_cpus: int) -> int:
    """Default max_num_batched_tokens on CPU: a power of two near 32 tokens per core."""
    n = max(CPU_MIN_STEP_TOKENS, min(CPU_MAX_STEP_TOKENS, CPU_TOKENS_PER_CORE_PER_STEP * num_cpus))
    return 1 << (n.bit_length() - 1)


def configure_cpu_threads(requested: int | None) -> int:
    """Set torch's intra-op pool to `requested` threads, or to the cores available; returns it."""
    import torch

    n = requested if requested else available_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
