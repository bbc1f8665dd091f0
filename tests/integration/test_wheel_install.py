"""The wheel works outside the checkout (issue 20): build it, install it into a fresh venv, and run
`pagedserve --help`, `pagedserve bench serve --help` and `from engine_core import LLM, SamplingParams`
from a directory where the checkout is not importable.

The fresh venv gets the project venv's site-packages as a plain path (a .pth line), so the heavy
dependencies are reused and the wheel installs with --no-deps in seconds. A plain path does not run
that directory's own .pth files, so the editable install's import hook (which maps engine_core,
services, gateway and benchmarks back to the checkout) is not active: every module the commands import
must come from the wheel, which the test checks through their __file__.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def _package_roots() -> list[str]:
    """The top-level packages pyproject.toml ships ("engine_core*" -> engine_core)."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return sorted({pattern.split(".")[0].rstrip("*") for pattern in find["include"]})


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the fresh venv, an environment that runs it outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the shipped sources: setuptools writes build/ and *.egg-info next to them,
    # which must not race with the shared checkout.
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
    for name in _package_roots():
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
         cwd=tmp, env=env, timeout=120)
    (wheel,) = dist.glob("pagedserve-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    vpy = venv / "bin" / "python"
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                     env=env).strip())
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-compile", "-q", str(wheel)], cwd=tmp, env=env,
         timeout=120)
    work = tmp / "elsewhere"  # not the checkout, not its parent: nothing of the repo on sys.path
    work.mkdir()
    return venv, {**env, "_WORK": str(work)}


def test_console_script_help(installed):
    venv, env = installed
    out = _run([str(venv / "bin" / "pagedserve"), "--help"], cwd=Path(env["_WORK"]), env=env)
    for command in ("generate", "serve", "client", "bench", "health"):
        assert command in out
    assert "unavailable" not in out


def test_bench_serve_help(installed):
    venv, env = installed
    out = _run([str(venv / "bin" / "pagedserve"), "bench", "serve", "--help"], cwd=Path(env["_WORK"]), env=env)
    assert "--max-concurrency" in out and "--goodput" in out  # the real parser, not the unavailable placeholder


def test_public_api_and_modules_come_from_the_wheel(installed):
    venv, env = installed
    code = ("from engine_core import LLM, SamplingParams, RequestOutput\n"
            "import engine_core, services.cli, gateway, benchmarks.serve_bench, sys\n"
            "assert LLM.__name__ == 'LLM' and SamplingParams().max_tokens > 0\n"
            "for m in (engine_core, services.cli, gateway, benchmarks.serve_bench, sys.modules['engine_core.llm']):\n"
            "    print(m.__file__)\n")
    files = _run([str(venv / "bin" / "python"), "-c", code], cwd=Path(env["_WORK"]), env=env).split()
    assert len(files) == 5
    for f in files:
        assert Path(f).resolve().is_relative_to(venv.resolve()), f"{f} is not from the installed wheel"
        assert not Path(f).resolve().is_relative_to(ROOT), f"{f} comes from the checkout"
