"""Speculative decoding on a GPU (skipped without CUDA): fp32 greedy tokens identical with speculation
off (CUDA graphs + async), n-gram and a (random, tiny) draft model,
sampled requests run; verification steps run eagerly next to graph-replayed decodes."""
from __future__ import annotations

import json
import os

import torch

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

SMOL = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs", "smollm2-135m-instruct.json")


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    base = [torch.randint(100, 40000, (int(n),), generator=g).tolist() for n in (12, 40, 7, 90)]
    return [p * 3 for p in base]  # repetitive: prompt lookup finds matches


def _run(spec, params, seed_weights: int = 0) -> tuple[list[list[int]], object]:
    torch.manual_seed(seed_weights)
    llm = LLM(model=f"dummy:{SMOL}", dtype="float32", max_model_len=1024, max_num_seqs=16,
              kv_cache_memory_gb=1.0, speculative_config=spec)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], llm.engine.core.counters


def test_greedy_identical_ngram_and_draft(tmp_path):
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref, _ = _run(None, greedy)
    ngram, c = _run({"method": "ngram", "num_speculative_tokens": 4}, greedy)
    assert ngram == ref and c.spec_decode_num_draft_tokens > 0
    # A tiny random draft: mostly rejections, still the target's greedy tokens.
    cfg = tmp_path / "tiny.json"
    with open(SMOL) as f:
        d = json.load(f)
    d.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2)
    cfg.write_text(json.dumps(d))
    rand, c = _run({"method": "draft_model", "model": f"dummy:{cfg}", "num_speculative_tokens": 3}, greedy)
    assert rand == ref and c.spec_decode_num_draft_tokens > 0


def test_sampled_requests_run():
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, max_tokens=32,
                            ignore_eos=True, seed=5)
    out, _ = _run({"method": "ngram", "num_speculative_tokens": 4}, params)
    assert all(len(t) == 32 for t in out)
