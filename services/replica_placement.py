"""Where each of `pagedserve serve --replicas N`'s executors runs on one machine.

- CUDA: replica i sees GPU i alone (CUDA_VISIBLE_DEVICES), as one pod per GPU would on Kubernetes;
  more replicas than GPUs share them round-robin (allowed, but they then compete for one GPU).
- CPU: the launcher's CPUs are split into N disjoint sets; executor i is pinned to set i
  (sched_setaffinity) with OMP_NUM_THREADS = its size, so the replicas' matmuls do not fight over
  cores (the simulation of N devices that the scale-out benchmark uses). With fewer CPUs than
  replicas they share all of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Placement:
    env: dict[str, str] = field(default_factory=dict)
    cpus: frozenset[int] | None = None  # pin the process to these CPUs (None: inherit)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.env.items()]
        if self.cpus is not None:
            parts.append(f"cpus {','.join(map(str, sorted(self.cpus)))}")
        return ", ".join(parts) or "shared"


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def replica_placements(n: int, device: str, cpus: list[int] | None = None,
                       gpus: list[str] | None = None, cpus_per_replica: int | None = None) -> list[Placement]:
    """cpus_per_replica: pin each CPU replica to that many cores (also a single one: the baseline
    of a scaling measurement); default: the CPUs split evenly, a single replica unpinned."""
    if n < 1:
        raise ValueError(f"--replicas must be >= 1, got {n}")
    if n == 1 and cpus_per_replica is None:
        return [Placement()]
    if device == "auto" or device.startswith("cuda"):
        gpus = _visible_gpus() if gpus is None else gpus
    if device.startswith("cuda") or (device == "auto" and gpus):
        if not gpus:
            return [Placement() for _ in range(n)]
        return [Placement(env={"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}) for i in range(n)]
    cpus = available_cpus() if cpus is None else cpus
    per = cpus_per_replica or len(cpus) // n
    if per < 1 or per * n > len(cpus):
        if cpus_per_replica:
            raise ValueError(f"--cpus-per-replica {cpus_per_replica} x {n} replicas needs {per * n} CPUs; "
                             f"{len(cpus)} are available")
        return [Placement() for _ in range(n)]
    out = []
    for i in range(n):
        chunk = frozenset(cpus[i * per:(i + 1) * per])
        out.append(Placement(env={"OMP_NUM_THREADS": str(len(chunk))}, cpus=chunk))
    return out
