"""The offline engine on the real SmolLM2: bad input is rejected with clear errors while the engine
keeps serving, seeded sampling reproduces, logprobs are the model's log-softmax, stop handling."""
from __future__ import annotations

import pytest
import torch

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256, kv_cache_memory_gb=0.25, seed=0)


def test_bad_input_is_rejected_and_engine_keeps_serving(llm):
    eng = llm.engine
    eng.add_request("good", "The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty", "", SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty-ids", [], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len is 256"):
        eng.add_request("long", [42] * 300, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("oov", [10, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        eng.add_request("bad-stop", "hi", SamplingParams(stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("good", "again", SamplingParams())
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert set(outs) == {"good"}
    assert outs["good"].outputs[0].finish_reason == "length"
    assert len(outs["good"].outputs[0].token_ids) == 8
    # Nothing leaked: every block is back (free or cached).
    bm = eng.core.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        LLM(model="/no/such/model")


def test_invalid_engine_config():
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=3)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(gpu_memory_utilization=0)


def test_seeded_sampling_reproduces_regardless_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    alone = llm.generate(["Tell me a story."], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12)
    batch = llm.generate(["Hello", "Tell me a story.", "Why is the sky blue?"], [others, p, others],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate(["Tell me a story."], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12,
                                                                  seed=99), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_parallel_samples_differ_and_reproduce(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7)
    a = llm.generate(["Write a word:"], p, use_tqdm=False)[0]
    b = llm.generate(["Write a word:"], p, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_logprobs_match_model_log_softmax(llm, hf_model):
    prompt = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=5), use_tqdm=False)[0]
    comp = out.outputs[0]
    ids = prompt + comp.token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(comp.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == comp.token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=2e-3)
        assert lp.rank == 1  # greedy picks the top token
        top = torch.topk(row, 5)
        assert lp.top_token_ids == top.indices.tolist()
        assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=2e-3)


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    text = base.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    tok = base.outputs[0].token_ids[2]
    out = llm.generate(["Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tok]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == base.outputs[0].token_ids[:3]


def test_chat_uses_template_and_stops_at_im_end(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=64),
                   use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == 1  # <|im_start|> from the ChatML template
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in comp.text and comp.text.strip()
