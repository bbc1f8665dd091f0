"""Beam search on forked block tables equals HF transformers' `generate(num_beams=4,
do_sample=False)` (same length_penalty, early_stopping=False, EOS handling and final ranking) on
SmolLM2: every returned beam, token for token, in HF's order."""
from __future__ import annotations

import pytest
import torch

from engine_core.beam_search import BeamSearchParams
from engine_core.llm import LLM

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Q: What is 7 times 8?\nA:",
    "The three primary colors are",
    "Once upon a time, in a land far away, there lived a dragon who",
]
MAX_NEW = 12
BEAMS = 4


@torch.inference_mode()
def hf_beam_search(model, prompt_ids: list[int], num_beams: int, max_new: int, length_penalty: float = 1.0,
                   eos: bool = True) -> list[tuple[list[int], float]]:
    """HF's beams (generated tokens incl. EOS, score), best first."""
    kw = {} if eos else {"eos_token_id": None}
    out = model.generate(torch.tensor([prompt_ids]), num_beams=num_beams, num_return_sequences=num_beams,
                         do_sample=False, max_new_tokens=max_new, length_penalty=length_penalty,
                         early_stopping=False, return_dict_in_generate=True, output_scores=True,
                         pad_token_id=model.generation_config.eos_token_id if eos else 0, **kw)
    beams = []
    for seq, idx, score in zip(out.sequences, out.beam_indices, out.sequences_scores):
        n_gen = int((idx >= 0).sum())
        beams.append((seq[len(prompt_ids):len(prompt_ids) + n_gen].tolist(), float(score)))
    return beams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512, kv_cache_memory_gb=0.1)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    return [llm.tokenizer.encode(p) for p in PROMPTS]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_hf(llm, hf_model, prompt_ids, length_penalty):
    got = llm.beam_search(prompt_ids, BeamSearchParams(beam_width=BEAMS, max_tokens=MAX_NEW,
                                                       length_penalty=length_penalty))
    for ids, res in zip(prompt_ids, got):
        want = hf_beam_search(hf_model, ids, BEAMS, MAX_NEW, length_penalty)
        assert [s.output_token_ids for s in res.sequences] == [w[0] for w in want]
        for s, (_, score) in zip(res.sequences, want):
            assert s.score == pytest.approx(score, abs=1e-3)
    assert llm.engine.core.scheduler.block_manager.num_used_blocks == 0


def test_beam_search_ignore_eos_equals_hf(llm, hf_model, prompt_ids):
    got = llm.beam_search(prompt_ids[:2], BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True))
    for ids, res in zip(prompt_ids[:2], got):
        want = hf_beam_search(hf_model, ids, 3, 8, eos=False)
        assert [s.output_token_ids for s in res.sequences] == [w[0] for w in want]


def test_beam_search_under_preemption_and_abort_leaks_nothing(llm, prompt_ids):
    params = BeamSearchParams(beam_width=BEAMS, max_tokens=MAX_NEW)
    want = [s.output_token_ids for s in llm.beam_search([prompt_ids[4]], params)[0].sequences]
    # 4 usable blocks of 16 tokens for 4 beams of up to 17 tokens that fork every step: beams are
    # preempted (recomputed) and forks happen from preempted beams too.
    small = LLM(max_model_len=64, num_gpu_blocks_override=5)
    got = [s.output_token_ids for s in small.beam_search([prompt_ids[4]], params)[0].sequences]
    sched = small.engine.core.scheduler
    assert sched.num_preemptions > 0
    assert got == want
    assert sched.block_manager.num_used_blocks == 0
    eng = llm.engine
    eng.add_beam_search_request("abort-me", prompt_ids[1], params)
    for _ in range(4):
        eng.step()
    assert eng.core.scheduler.block_manager.num_used_blocks > 0
    eng.abort_request("abort-me")
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert eng.core.scheduler.block_manager.num_used_blocks == 0 and not eng.core.scheduler.groups
    assert {o.finish_reason for o in outs[-1].outputs} == {"abort"}
