"""--speculative-config on the command line: parsed into EngineConfig, forwarded by `pagedserve
serve` to the executor and scheduler children verbatim, and a bad value stops `serve` at once."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from engine_core.config import EngineConfig
from services.launcher import engine_flags

ROOT = Path(__file__).resolve().parents[2]
SPEC = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'


def test_flag_parses_and_is_forwarded_to_children():
    args = EngineConfig.add_cli_args(argparse.ArgumentParser()).parse_args(["--speculative-config", SPEC])
    cfg = EngineConfig.from_cli_args(args)
    assert cfg.speculative_config.num_speculative_tokens == 3 and cfg.speculative_config.prompt_lookup_max == 3
    flags = engine_flags(args)
    i = flags.index("--speculative-config")
    assert flags[i + 1] == SPEC


def test_serve_refuses_a_bad_config_before_starting_anything():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--speculative-config",
                        '{"method": "eagle", "num_speculative_tokens": 2}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "method must be one of" in r.stderr
