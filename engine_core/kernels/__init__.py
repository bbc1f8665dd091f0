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
import os


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


def pdl_launch_args(device) -> dict[str, bool]:
    """The launch keywords of a decode-chain kernel: its USE_PDL constexpr and Triton's launch_pdl,
    always equal (a kernel launched with PDL must wait in its first instruction)."""
    on = pdl_enabled(device)
    return {"USE_PDL": on, "launch_pdl": on}


def pdl_enabled(device) -> bool:
    """Launch the decode chain's kernels with programmatic dependent launch (Hopper and later)?

    A decode step is ~340 small kernels on the 8B model; between two of them the GPU drains one grid
    and only then launches the next. With PDL (`launch_pdl=True`) the next grid is launched while
    the previous one runs: each kernel starts with `griddepcontrol.wait` (`USE_PDL` in the kernels),
    which blocks until everything before it in the stream has completed and its writes are
    visible, then `griddepcontrol.launch_dependents`, which lets the next kernel's programs get
    resident (and wait) while this one works. Every kernel launched this way waits before it reads
    anything, so the stream's order holds, transitively, whatever launched before it. H200, 8B bs1
    decode, same run: fp8 321.3 -> 331.5 tok/s with the wait alone; 334.2 -> 346.9 adding the early
    trigger (`benchmarks/gpu_fp8.py [--disable-pdl]`). Off under the Triton interpreter (no inline
    PTX) and before sm_90."""
    return _pdl_enabled(device.index if device.index is not None else -1)


@functools.cache
def _pdl_enabled(index: int) -> bool:
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(None if index < 0 else index)[0] >= 9
