"""`pagedserve` subcommands that need the serve extra (serve, client, bench, health) degrade to a clear
message when their modules cannot load, e.g. when the generated gRPC stubs reject an older grpcio with
a RuntimeError at import; `pagedserve generate` and the other subcommands keep working."""
from __future__ import annotations

import importlib

import pytest

from services import cli

STUB_ERROR = ("The grpc package installed is at version 1.60.0, but the generated code in "
              "pagedserve/v1/common_pb2_grpc.py depends on grpcio>=1.85.1.")


@pytest.fixture
def broken_client(monkeypatch):
    """services.client fails to import the way it does with an old grpcio."""
    real = importlib.import_module

    def import_module(name, package=None):
        if name == "services.client":
            raise RuntimeError(STUB_ERROR)
        return real(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)


def test_stub_version_error_is_a_message_not_a_traceback(broken_client, capsys):
    assert cli.main(["client", "hello", "--max-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "`pagedserve client` is unavailable" in err and "grpcio>=1.85.1" in err and "Traceback" not in err


def test_other_subcommands_still_register(broken_client):
    args = cli.build_parser().parse_args(["bench", "serve", "--num-prompts", "2"])
    assert args.num_prompts == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0


def _fail_import(monkeypatch, module: str, missing: str) -> None:
    """Make the CLI's import of `module` fail as if package `missing` were not installed."""
    real = importlib.import_module

    def import_module(name, package=None):
        if name == module:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)


def test_missing_extra_names_the_install(monkeypatch, capsys):
    _fail_import(monkeypatch, "services.launcher", "grpc")
    assert cli.main(["serve"]) == 2
    assert "pip install 'pagedserve[serve]'" in capsys.readouterr().err


def test_unknown_options_still_rejected_for_available_commands():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "serve", "--no-such-flag"])
    assert e.value.code == 2


def test_left_out_package_is_not_blamed_on_the_extra(monkeypatch, capsys):
    """The Docker image leaves benchmarks/ out: `pagedserve bench` says so instead of suggesting the extra."""
    _fail_import(monkeypatch, "benchmarks.serve_bench", "benchmarks")
    assert cli.main(["bench", "serve", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err
    assert "this install leaves it out" in err and "pagedserve[serve]" not in err
