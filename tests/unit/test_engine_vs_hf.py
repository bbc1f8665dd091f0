"""Greedy output of the whole engine (scheduler + block manager + paged attention + sampler) equals
HF transformers' greedy output token for token, with all prompts batched together, under chunked
prefill, under preemption and with prefix caching."""
from __future__ import annotations

import pytest

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams
from tests.conftest import hf_greedy

MAX_NEW = 20
SYSTEM = ("You are a meticulous assistant. Answer briefly and precisely, and prefer concrete facts "
          "over speculation. ")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "1, 2, 3, 4,",
    "Translate to French: I like cheese.",
    ("A paged KV cache stores keys and values in fixed-size blocks so that memory fragmentation "
     "stays low and many sequences share the GPU. Explain why this matters for serving:"),
    "Q: What is 7 times 8?\nA:",
    "The three primary colors are",
    "In Python, a list comprehension",
]


@pytest.fixture(scope="module")
def prompt_ids(hf_model, gguf_path):
    from engine_core.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf_path)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, MAX_NEW) for ids in prompt_ids]


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def _run(llm: LLM, prompt_ids):
    return [o.outputs[0].token_ids for o in llm.generate(prompt_ids, _greedy(), use_tqdm=False)]


def test_batched_greedy_matches_hf(prompt_ids, expected):
    llm = LLM(max_model_len=512, kv_cache_memory_gb=0.25)
    got = _run(llm, prompt_ids)
    assert got == expected
    assert llm.engine.core.scheduler.num_preemptions == 0


def test_chunked_prefill_matches_hf(prompt_ids, expected):
    llm = LLM(max_model_len=512, max_num_batched_tokens=32, kv_cache_memory_gb=0.25)
    assert max(len(p) for p in prompt_ids) > 32  # at least one prompt really is chunked
    assert _run(llm, prompt_ids) == expected


def test_preemption_matches_hf(prompt_ids, expected):
    # 11 usable blocks of 16 tokens = 176 tokens for 9 requests needing ~40 tokens each at the end:
    # the scheduler must preempt (recompute) to finish them all.
    llm = LLM(max_model_len=128, num_gpu_blocks_override=12, max_num_batched_tokens=128)
    assert _run(llm, prompt_ids) == expected
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_prefix_caching_hits_and_matches_hf(hf_model, gguf_path):
    from engine_core.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf_path)
    prompts = [tok.encode(SYSTEM * 3 + q) for q in ("Name a fruit.", "Name a planet.", "Name a color.")]
    want = [hf_greedy(hf_model, ids, MAX_NEW) for ids in prompts]
    llm = LLM(max_model_len=512, kv_cache_memory_gb=0.25, enable_prefix_caching=True)
    # First request fills the cache; the others then reuse its full prefix blocks.
    first = llm.generate([prompts[0]], _greedy(), use_tqdm=False)
    rest = llm.generate(prompts[1:], _greedy(), use_tqdm=False)
    bm = llm.engine.core.scheduler.block_manager
    assert bm.prefix_cache_hits >= 2 * 16 * 3  # each of the two later requests hit >= 3 blocks
    assert all(o.num_cached_tokens >= 48 for o in rest)
    assert [o.outputs[0].token_ids for o in first + rest] == want
