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
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import lru_cache

# Prefill work per step on CPU: about 64 tokens per core keeps a step of a ~100M-parameter model
# near 250 ms (2-core AMX VM, SmolLM2, spinning OpenMP workers: a 128-token step takes ~230 ms in
# fp32, ~120 ms in bf16; ~2x that with PASSIVE workers on a busy box), so a long prompt is cut into
# chunks and streams already decoding keep getting a token every step or two. 32 per core (the
# earlier default) left aggregate throughput behind: 16 streams of 128 in / 64 out, bf16: 155 tok/s
# at a 64-token budget, 194 at 128, 204 at 256.
CPU_TOKENS_PER_CORE_PER_STEP = 64
CPU_MIN_STEP_TOKENS = 32
CPU_MAX_STEP_TOKENS = 2048
# OpenMP workers between parallel regions: libgomp lets them spin (GOMP_SPINCOUNT iterations of
# `pause`, 300k by default) before they sleep; OMP_WAIT_POLICY=PASSIVE makes them sleep at once.
# Which one wins depends on whether the cores are free:
# - idle box (2-core AMX VM, SmolLM2, 2 threads): a sleeping worker takes ~50-80 us to wake for each
#   of the ~20 parallel regions of a layer, so PASSIVE halves the speed: int4-bf16 decode 31 -> 56
#   tok/s, bf16 841-token prefill 480 -> 1,100 tok/s with GOMP_SPINCOUNT=10000 (10k-300k alike);
#   llama.cpp's OpenMP pool in the same process: 28 -> 94 tok/s.
# - busy box (load average 6-7 on 2 cores): a spinning worker takes the core from the thread that
#   still has work and every region waits on a descheduled thread: int4 decode 1.3 tok/s with the
#   default spin, 3-4 with GOMP_SPINCOUNT=30000, 10-15 with 3000, 21-29 with PASSIVE.
# So the default is chosen at startup from how busy the CPUs are (a 50 ms /proc/stat sample):
# spin briefly if at least SPIN_IF_IDLE_FRACTION of them are idle, else PASSIVE. The user's
# OMP_WAIT_POLICY / GOMP_SPINCOUNT always win.
DEFAULT_GOMP_SPINCOUNT = "10000"  # ~0.5 ms of spinning: covers the gaps inside a forward pass
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"  # when the box is busy
SPIN_IF_IDLE_FRACTION = 0.6


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


def cpu_idle_fraction(interval_s: float = 0.05, stat_path: str = "/proc/stat") -> float | None:
    """Share of all CPUs' time spent idle over a short sample (/proc/stat); None where unreadable."""
    def sample() -> tuple[int, int] | None:
        line = _read(stat_path)
        if not line or not line.startswith("cpu "):
            return None
        vals = [int(v) for v in line.splitlines()[0].split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait

    a = sample()
    if a is None:
        return None
    time.sleep(interval_s)
    b = sample()
    if b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


def openmp_wait_policy(environ: Mapping[str, str] | None = None) -> str | None:
    """The OpenMP waiting the environment asks for: OMP_WAIT_POLICY, else GOMP_SPINCOUNT=N, else
    None (libgomp's default spinning)."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return env["OMP_WAIT_POLICY"]
    return f"GOMP_SPINCOUNT={env['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in env else None


def set_openmp_wait_policy(environ: MutableMapping[str, str] | None = None,
                           torch_imported: bool | None = None,
                           idle_probe: Callable[[], float | None] = cpu_idle_fraction) -> str | None:
    """Unless the user chose one: GOMP_SPINCOUNT=10000 when most CPUs are idle, else
    OMP_WAIT_POLICY=PASSIVE (see DEFAULT_GOMP_SPINCOUNT). libgomp reads it once, when torch is
    imported, so this only takes effect before that: call it first thing in an entry point (child
    processes inherit it). idle_probe: the idle share of the CPUs (None = unknown, which spins);
    only called when the policy is ours to choose. Returns openmp_wait_policy() afterwards."""
    env = os.environ if environ is None else environ
    if torch_imported is None:
        torch_imported = "torch" in sys.modules
    if openmp_wait_policy(env) is None and not torch_imported:
        idle = idle_probe()
        if idle is not None and idle < SPIN_IF_IDLE_FRACTION:
            env["OMP_WAIT_POLICY"] = DEFAULT_OMP_WAIT_POLICY
        else:
            env["GOMP_SPINCOUNT"] = DEFAULT_GOMP_SPINCOUNT
    return openmp_wait_policy(env)


def cpu_step_token_budget(num_cpus: int) -> int:
    """Default max_num_batched_tokens on CPU: a power of two near 64 tokens per core."""
    n = max(CPU_MIN_STEP_TOKENS, min(CPU_MAX_STEP_TOKENS, CPU_TOKENS_PER_CORE_PER_STEP * num_cpus))
    return 1 << (n.bit_length() - 1)


def configure_cpu_threads(requested: int | None) -> int:
    """Set torch's intra-op pool to `requested` threads, or to the cores available; returns it."""
    import torch

    n = requested if requested else available_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
