"""Print CMAKE_ARGS that build llama.cpp (llama-cpp-python) for the CPU this runs on.

`make bench` used to force AVX-512 on, so on an AVX2-only CPU the benchmark died with "Illegal
instruction". Each ggml ISA option is now switched on only when /proc/cpuinfo lists the feature.
AMX stays off even where the CPU has it: its kernels segfault where the kernel does not grant the
process AMX tile state (seen in sandboxes), and the benchmark's peer must run everywhere.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.cpu_resources import cpu_flags

# ggml option -> the /proc/cpuinfo flag(s) it needs
GGML_ISA = {
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
    "GGML_AVX_VNNI": ("avx_vnni",),
}


def cmake_args(flags: frozenset[str]) -> list[str]:
    args = ["-DGGML_NATIVE=OFF"]
    for option, needs in GGML_ISA.items():
        args.append(f"-D{option}={'ON' if all(f in flags for f in needs) else 'OFF'}")
    args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return args


if __name__ == "__main__":
    print(" ".join(cmake_args(cpu_flags())))
