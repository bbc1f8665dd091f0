"""CPU-aware defaults: cores from the cgroup quota and affinity, the CPU step budget, --help."""
from __future__ import annotations

import argparse
import os

import pytest

from engine_core.config import EngineConfig
from engine_core.cpu_resources import (
    available_cpus,
    cgroup_cpu_limit,
    configure_cpu_threads,
    cpu_step_token_budget,
)


def _write(root, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    _write(tmp_path, "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 1.5
    assert available_cpus(str(tmp_path)) == min(2, len(os.sched_getaffinity(0)))  # ceil(1.5)


def test_cgroup_v2_unlimited_and_missing(tmp_path):
    _write(tmp_path, "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None
    assert available_cpus(str(tmp_path)) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_limit(str(tmp_path / "absent")) is None


def test_cgroup_v1_quota(tmp_path):
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "100000\n")
    _write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 1.0
    assert available_cpus(str(tmp_path)) == 1
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "-1\n")  # v1's "no limit"
    assert cgroup_cpu_limit(str(tmp_path)) is None


def test_cpu_step_budget_scales_with_cores_as_power_of_two():
    assert [cpu_step_token_budget(n) for n in (1, 2, 3, 8, 1000)] == [64, 128, 128, 512, 2048]


def test_resolve_limits_picks_cpu_budget_and_prefill_cap():
    cpu = EngineConfig(cpu_threads=2)
    cpu.resolve_limits(8192, "cpu")
    assert cpu.max_num_batched_tokens == 128
    assert cpu.long_prefill_token_threshold == 96
    gpu = EngineConfig()
    gpu.resolve_limits(8192, "cuda")
    assert gpu.max_num_batched_tokens == 2048
    explicit = EngineConfig(max_num_batched_tokens=512, long_prefill_token_threshold=0)
    explicit.resolve_limits(8192, "cpu")
    assert (explicit.max_num_batched_tokens, explicit.long_prefill_token_threshold) == (512, 0)


def test_configure_cpu_threads_round_trip():
    import torch

    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_cpu_threads(None) == available_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("field,value", [("quantization", "int3"), ("cpu_threads", 0),
                                         ("long_prefill_token_threshold", -1)])
def test_bad_values_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_help_documents_cpu_defaults():
    text = EngineConfig.add_cli_args(argparse.ArgumentParser()).format_help()
    assert "cgroup cpu.max" in text and "64 per available" in text and "int4" in text


def test_openmp_wait_policy_spins_on_an_idle_box_and_sleeps_on_a_busy_one():
    from engine_core.cpu_resources import set_openmp_wait_policy

    env: dict[str, str] = {}
    assert set_openmp_wait_policy(env, torch_imported=False, idle_probe=lambda: 0.95) == "GOMP_SPINCOUNT=10000"
    assert env == {"GOMP_SPINCOUNT": "10000"}
    env = {}
    assert set_openmp_wait_policy(env, torch_imported=False, idle_probe=lambda: 0.2) == "PASSIVE"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}  # /proc/stat unreadable: spin (a laptop outside Linux is rarely a shared box)
    assert set_openmp_wait_policy(env, torch_imported=False, idle_probe=lambda: None) == "GOMP_SPINCOUNT=10000"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice wins
    assert set_openmp_wait_policy(env, torch_imported=False, idle_probe=lambda: 0.2) == "ACTIVE"
    env = {"GOMP_SPINCOUNT": "0"}
    assert set_openmp_wait_policy(env, torch_imported=False, idle_probe=lambda: 0.95) == "GOMP_SPINCOUNT=0"
    env = {}
    assert set_openmp_wait_policy(env, torch_imported=True) is None and env == {}  # too late: libgomp read it


def test_cpu_idle_fraction_reads_proc_stat(tmp_path):
    from engine_core.cpu_resources import cpu_idle_fraction

    frac = cpu_idle_fraction(0.01)
    assert frac is None or 0.0 <= frac <= 1.0
    assert cpu_idle_fraction(0.0, str(tmp_path / "missing")) is None


def test_openmp_wait_policy_set_by_the_offline_api_in_a_fresh_process():
    import subprocess
    import sys

    code = ("import os; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('GOMP_SPINCOUNT', None)\n"
            "import engine_core.llm, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() in (["PASSIVE", "None"], ["None", "10000"])  # one of the two, by how busy the box is
