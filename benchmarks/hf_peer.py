"""The HF transformers peer built from a config JSON with random weights (no hub downloads), shared
by the GPU benchmarks and the GPU parity tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def hf_model_from_config(path: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in json.loads(Path(path).read_text()).items() if k != "transformers_version"}
    torch.manual_seed(seed)
    with torch.device(device):  # random init straight on the device: an 8B init on the CPU takes minutes
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype).eval()
