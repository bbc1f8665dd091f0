"""Speculative decoding in-process on the real SmolLM2 (CPU): greedy output is token-identical with
speculation off, n-gram and draft model (the same GGUF as its own draft: ~100 % acceptance; a random
tiny draft: mostly rejections); sampled requests with every sampling param run; bad configs fail
at startup."""
from __future__ import annotations

import json

import pytest

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

PROMPTS = [
    "Copy this list exactly: apple, banana, cherry, apple, banana, cherry, apple, banana,",
    "The code is: for i in range(10): print(i)\nfor i in range(10): print(i)\nfor",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
ENGINE = {"max_model_len": 512, "kv_cache_memory_gb": 0.05}


def _tiny_draft_config(path) -> str:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "vocab_size": 49152, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2}
    f = path / "tiny_draft.json"
    f.write_text(json.dumps(cfg))
    return f"dummy:{f}"


def _run(spec: dict | None, params=GREEDY, prompts=PROMPTS) -> tuple[list[list[int]], object]:
    llm = LLM(None, speculative_config=spec, **ENGINE)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], llm.engine.core.counters


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return _run(None)[0]


def test_ngram_greedy_identical(reference):
    tokens, c = _run({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                      "prompt_lookup_min": 1})
    assert tokens == reference
    assert c.spec_decode_num_draft_tokens > 0 and c.spec_decode_num_accepted_tokens > 0
    assert sum(c.spec_decode_num_accepted_tokens_per_pos) == c.spec_decode_num_accepted_tokens


def test_draft_model_self_greedy_identical(reference, gguf_path):
    tokens, c = _run({"method": "draft_model", "model": gguf_path, "num_speculative_tokens": 3})
    assert tokens == reference
    # The target as its own draft: (nearly) every draft accepted (fp32 batch-shape noise aside).
    assert c.spec_decode_num_accepted_tokens >= 0.9 * c.spec_decode_num_draft_tokens > 0


def test_random_draft_model_greedy_identical(reference, tmp_path):
    tokens, c = _run({"method": "draft_model", "model": _tiny_draft_config(tmp_path), "num_speculative_tokens": 2})
    assert tokens == reference
    assert c.spec_decode_num_draft_tokens > 0
    assert c.spec_decode_num_accepted_tokens < c.spec_decode_num_draft_tokens  # rejections happened


def test_sampled_requests_with_params_run(gguf_path):
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5,
                             logit_bias={11: 2.0}, min_tokens=4, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)]  # not speculated
    spec = {"method": "draft_model", "model": gguf_path, "num_speculative_tokens": 2}
    tokens, c = _run(spec, params, PROMPTS + PROMPTS[:1])
    assert len(tokens[0]) == 12 and 4 <= len(tokens[1]) <= 12 and len(tokens[2]) == 12
    assert c.spec_decode_num_draft_tokens > 0
    # A seeded request is reproducible (for the same batch: which positions get verified in which
    # step, hence which draws are made, depends on the drafts, as in vLLM).
    ngram = {"method": "ngram", "num_speculative_tokens": 3}
    assert _run(ngram, params[:1], PROMPTS[:1])[0] == _run(ngram, params[:1], PROMPTS[:1])[0]


@pytest.mark.parametrize("spec,match", [
    ('{"method": "ngram"', "not valid JSON"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "foo": 1}, "unknown key"),
])
def test_bad_config_fails_at_startup(spec, match):
    with pytest.raises(ValueError, match=match):
        LLM(None, speculative_config=spec, **ENGINE)


def test_draft_vocab_mismatch_fails_at_startup(tmp_path):
    spec_model = _tiny_draft_config(tmp_path)
    path = tmp_path / "tiny_draft.json"
    d = json.loads(path.read_text())
    d["vocab_size"] = 32000
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(None, speculative_config={"method": "draft_model", "model": spec_model, "num_speculative_tokens": 2},
            **ENGINE)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_preemption_and_prefix_cache_under_speculation(gguf_path, method):
    """A KV cache too small for every request at once: requests are preempted mid-speculation and
    resumed from their tokens (prefix-cache hits on the shared prompt head); greedy output still
    equals a run without speculation on the same small cache."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0] + " cherry, apple,"]
    small = {"max_model_len": 128, "num_gpu_blocks_override": 10}  # 9 usable blocks of 16
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": 4} if method == "ngram" else \
        {"method": "draft_model", "model": gguf_path, "num_speculative_tokens": 3}
    out = {}
    for name, cfg in (("off", None), ("spec", spec)):
        llm = LLM(None, speculative_config=cfg, **small)
        out[name] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        stats = llm.engine.core.stats()
        if name == "spec":
            assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
            assert llm.engine.core.counters.spec_decode_num_accepted_tokens > 0
        assert stats.num_free_blocks == stats.num_kv_blocks  # everything freed at the end
    assert out["spec"] == out["off"]
