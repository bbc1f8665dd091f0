"""The checked-in generated code (services/gen/) must match protos/ (regenerate: `make protos`)."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "services" / "gen"

# Lines that name the generator's version: a grpcio-tools upgrade alone is not staleness.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|\s+\d+,\s*$)", re.MULTILINE)


def _load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _VERSION_LINES.sub("<version>", p.read_text())
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = _load_gen_script()
    gen.generate(tmp_path)
    fresh, checked_in = _files(tmp_path), _files(GEN)
    missing = sorted(set(fresh) - set(checked_in))
    extra = sorted(set(checked_in) - set(fresh))
    stale = sorted(f for f in set(fresh) & set(checked_in) if fresh[f] != checked_in[f])
    assert not (missing or extra or stale), (
        f"services/gen is stale (run `make protos` / `python scripts/gen_protos.py`): "
        f"missing={missing} extra={extra} stale={stale}")


def test_generated_imports_are_package_relative():
    for p in GEN.rglob("*.py"):
        assert "from pagedserve.v1 import" not in p.read_text(), p
    from services.gen.pagedserve.v1 import (  # noqa: F401
        executor_pb2_grpc,
        scheduler_pb2,
        tokenizer_pb2_grpc,
    )

    assert "pagedserve" not in sys.modules  # no top-level `pagedserve` package is claimed


def test_services_declared():
    from services.gen.pagedserve.v1 import executor_pb2, scheduler_pb2, tokenizer_pb2

    assert set(executor_pb2.DESCRIPTOR.services_by_name["Executor"].methods_by_name) == {"Describe", "Step", "Reset"}
    step = executor_pb2.DESCRIPTOR.services_by_name["Executor"].methods_by_name["Step"]
    assert step.client_streaming and step.server_streaming
    assert set(scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name) == {
        "Generate", "GenerateStream", "Abort", "GetStats", "WatchStats", "GetModelInfo"}
    assert set(tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].methods_by_name) == {
        "Encode", "EncodeBatch", "ApplyChatTemplate", "Decode", "DetokenizeStream", "DetokenizeBatch", "GetInfo",
        "DecodeTokens"}
    from services.gen.pagedserve.v1 import admin_pb2

    assert set(admin_pb2.DESCRIPTOR.services_by_name["SchedulerAdmin"].methods_by_name) == {"SwapExecutor"}
