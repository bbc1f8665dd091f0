"""Shared fixtures: the embedded SmolLM2 GGUF, an in-process engine on it, and the HF oracle."""
from __future__ import annotations

import os

import pytest
import torch

from engine_core.loader.model_source import embedded_gguf_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Server processes the tests start share 2 cores with pytest: their OpenMP workers sleep at once
# rather than spin (engine_core/cpu_resources.py), whatever the box looked like when they started.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smol_tokenizer(gguf_path):
    """engine_core's tokenizer of the embedded SmolLM2 (for the tokenizer service in test stacks)."""
    from engine_core.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """HF transformers' own model, loaded from the same GGUF: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with HF's KV cache; never stops early (we compare with ignore_eos)."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens
