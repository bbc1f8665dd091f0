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


class LazyTensor:
    """A checkpoint tensor not read yet (tensor-parallel loading): `narrow` reads only the rows or
    columns a rank keeps, `materialize` the whole tensor. Valid while its file is open, i.e. while
    the loader consumes it inside the iteration that yielded it."""

    def __init__(self, tensor_slice) -> None:
        self._slice = tensor_slice
        self.shape = tuple(tensor_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]

    def materialize(self) -> torch.Tensor:
        return self._slice[:]


def iter_safetensors_weights(model_dir: str, device: torch.device | str = "cpu",
                             lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """(name, tensor) for every checkpoint tensor; lazy=True yields LazyTensors instead (a
    tensor-parallel rank reads only its slices)."""
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir!r}")
    dev = str(device) if torch.device(device).type == "cuda" else "cpu"
    for path in files:
        with safe_open(path, framework="pt", device=dev) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, (LazyTensor(f.get_slice(name)) if lazy else f.get_tensor(name))
