"""Tensor parallelism over NCCL (one worker process per GPU): same greedy tokens as TP=1, and CUDA
graphs (with the all-reduces captured inside) equal eager mode. Needs >= 2 GPUs (a multi-GPU
device kind); skipped otherwise. The CPU/gloo twin is tests/unit/test_tensor_parallel.py.

    python -m pytest -q tests/gpu/test_tensor_parallel_gpu.py
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs")
QWEN3 = os.path.join(CONFIGS, "qwen3-0.6b.json")  # 16 Q / 8 KV heads, q/k norm, tied head
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# 8 Q / 2 KV heads: at TP=4 every KV head is held by two ranks (replication path).
SMALL_GQA = {"architecture": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1001,
             "max_position_embeddings": 1024, "eos_token_ids": [2]}

pytestmark = pytest.mark.skipif(GPUS < 2, reason="tensor parallelism needs >= 2 GPUs")

PROMPTS = [list(range(100, 100 + n)) for n in (5, 17, 64, 130)]


def _tokens(model: str, tp: int, dtype: str, eager: bool = False, n: int = 32) -> list[list[int]]:
    llm = LLM(model=model, dtype=dtype, tensor_parallel_size=tp, enforce_eager=eager, max_model_len=512,
              max_num_seqs=8, gpu_memory_utilization=0.3)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_qwen3_fp32_tp_matches_tp1(tp):
    if tp > GPUS:
        pytest.skip(f"{GPUS} GPUs")
    assert _tokens(f"dummy:{QWEN3}", tp, "float32") == _tokens(f"dummy:{QWEN3}", 1, "float32")


def test_replicated_kv_heads_fp32(tmp_path):
    tp = 4 if GPUS >= 4 else 2
    path = tmp_path / "small_gqa.json"
    path.write_text(json.dumps(SMALL_GQA))
    assert _tokens(f"dummy:{path}", tp, "float32") == _tokens(f"dummy:{path}", 1, "float32")


def test_cuda_graphs_with_nccl_match_eager():
    assert _tokens(f"dummy:{QWEN3}", 2, "bfloat16") == _tokens(f"dummy:{QWEN3}", 2, "bfloat16", eager=True)
