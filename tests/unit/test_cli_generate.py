"""`pagedserve generate` streams text from the in-process engine; bad input exits cleanly."""
from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "generate", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_generate_streams_text():
    r = _run("What is the capital of France?", "--max-tokens", "12", "--max-model-len", "256")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr


def test_generate_unknown_model_is_a_clear_error():
    r = _run("hi", "--model", "/no/such/model.gguf")
    assert r.returncode == 2
    assert "/no/such/model.gguf" in r.stderr and "Traceback" not in r.stderr
