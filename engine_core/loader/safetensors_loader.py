"""Weights from an HF model directory (*.safetensors), yielded under their HF names; the model's
`load_weights` maps q/k/v and gate/up onto its fused parameters."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    # Mistral repos ship both HF shards and a consolidated.safetensors with native names
    hf_files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    return hf_files or files


def iter_safetensors_weights(model_dir: str, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir!r}")
    dev = str(device) if torch.device(device).type == "cuda" else "cpu"
    for path in files:
        with safe_open(path, framework="pt", device=dev) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
