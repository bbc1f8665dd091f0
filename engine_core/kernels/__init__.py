"""Triton kernels for the CUDA path (DESIGN.md §4). Each kernel has a pure-torch twin in
engine_core/layers/ that is the CPU path and the test oracle.

Nothing here is imported on the CPU path: engine_core/layers/* import these modules lazily, only
when a tensor is on CUDA. That keeps CPU-only runs free of triton and lets the interpreter tests
(tests/unit/test_kernels_interpret.py) load private, interpreted copies of these modules:
triton 3.6 decides JIT vs interpreter when `@triton.jit` decorates a function, i.e. at import.
Keep every `@triton.jit` helper inside the module that uses it for the same reason.
"""
from __future__ import annotations

import functools


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (cached)."""
    return _triton_available()


@functools.cache
def _triton_available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: use the torch path
        return False
    return torch.cuda.is_available()
