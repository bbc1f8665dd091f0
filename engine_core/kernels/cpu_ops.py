"""The C++ CPU decode kernels (cpu_decode_ops.cpp, cpu_quant_gemv.cpp): built once per machine, loaded on demand.

`cpu_ops()` returns the compiled module, or None where it cannot be had (no C++ compiler or Python
headers, an unsupported platform, or PAGEDSERVE_CPU_KERNELS=0): the layers then run their pure-torch
twins, which compute the same thing with more ops. Why they exist and what each replaces: the
header of cpu_decode_ops.cpp.

Build: `torch.utils.cpp_extension` with -O3 -march=native, i.e. for the instruction set of the CPU
it is built on (AVX-512 / AVX2 are detected by the compiler, nothing is hard-coded). The shared
object is cached under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) in a directory
named after a hash of the source, the flags, the torch and Python versions and this CPU's model and
feature flags, so a home directory shared between different machines never loads a binary built for
another CPU. Each build goes to a private temporary directory and is renamed into place, so
concurrent first starts (the test suite, the service processes) never wait on a lock a killed
build left behind. `make setup` builds it (`python -m engine_core.kernels.cpu_ops`), so the first
server start does not pay the ~1 minute compile.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_decode_ops.cpp", "cpu_quant_gemv.cpp"))
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)  # resolves to the libgomp torch already loaded (same soname): one thread pool
DISABLE_ENV = "PAGEDSERVE_CPU_KERNELS"


def cpu_ops() -> ModuleType | None:
    """The compiled kernels, or None (then use the torch twins). Built on first use if not cached."""
    return _load().module


def cpu_ops_status() -> str:
    """One line for the startup log: where the kernels came from, or why they are off."""
    return _load().status


@dataclass(frozen=True)
class _Loaded:
    module: ModuleType | None
    status: str


@functools.cache
def _load() -> _Loaded:
    """Once per process: the module and the status line (loaded from where, or off and why)."""
    off = _why_off()
    if off is None:
        try:
            module, where = _load_or_build()
            return _Loaded(module, f"C++ decode kernels loaded ({where})")
        except Exception as e:  # noqa: BLE001 - any build problem means: run the torch twins
            log.warning("C++ CPU kernels unavailable, using the pure-torch layers: %s", e)
            off = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    return _Loaded(None, f"C++ decode kernels off ({off}); pure-torch layers")


def _why_off() -> str | None:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"{DISABLE_ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return f"unsupported platform {platform.system()}/{platform.machine()}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return None


def _cpu_signature() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def build_for_march(march: str) -> ModuleType:
    """The kernels built for another x86 level (`-march=x86-64-v3`: the AVX2 paths; `x86-64-v2`:
    the portable loops) instead of this CPU's: how the tests run the code paths other machines get.
    Cached like the native build."""
    return _load_or_build(tuple(f"-march={march}" if f == "-march=native" else f for f in CFLAGS))[0]


def _module_name(cflags: tuple[str, ...]) -> str:
    import torch

    h = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), " ".join(cflags + LDFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return f"pagedserve_cpu_ops_{h.hexdigest()[:16]}"


def _cache_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(root)


def _import(name: str, so_path: Path) -> ModuleType:
    import torch  # noqa: F401 - the extension links against libtorch, which must be loaded first

    loader = importlib.machinery.ExtensionFileLoader(name, str(so_path))
    spec = importlib.util.spec_from_file_location(name, so_path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _load_or_build(cflags: tuple[str, ...] = CFLAGS) -> tuple[ModuleType, Path]:
    """The module and the directory its shared object is cached in."""
    name = _module_name(cflags)
    final_dir = _cache_root() / name
    so_path = final_dir / f"{name}.so"
    if so_path.exists():
        return _import(name, so_path), final_dir
    from torch.utils import cpp_extension

    final_dir.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=final_dir))
    try:
        log.info("building the C++ CPU kernels in %s (once per machine, ~30 s)", build_dir)
        mod = cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=list(cflags),
                                 extra_ldflags=list(LDFLAGS),
                                 build_directory=str(build_dir), verbose=False)
        os.replace(build_dir / f"{name}.so", so_path)  # atomic: a reader sees no file or a whole one
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return mod, final_dir


if __name__ == "__main__":  # `make setup`: build now, so the first server start does not
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(cpu_ops_status())
