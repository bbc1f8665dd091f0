"""Sampler + SamplingMetadata: greedy, seeded sampling, filters, penalties, logprobs, bias, min_tokens."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core.layers.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from engine_core.sampling_metadata import SamplingMetadata
from engine_core.sampling_params import SamplingParams

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
SAMPLER = Sampler()


def build(params, device, V, outputs=None, prompts=None, gens=None, eos=(0,)):
    n = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    if gens is None:
        gens = [
            make_generator(p.seed, len(o), device) if p.seed is not None else None
            for p, o in zip(params, outputs)
        ]
    return SamplingMetadata.build(params, outputs, prompts, gens, V, device, list(eos))


def randn(n, V, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g) * scale).to(device)


# ------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device):
    logits = randn(8, 50, device)
    before = logits.clone()
    md = build([SamplingParams(temperature=0.0) for _ in range(8)], device, 50)
    assert md.all_greedy and not md.all_random
    out = SAMPLER(logits, md)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.ranks is None
    assert torch.equal(logits, before)  # input untouched


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_greedy_and_random(device):
    V, n = 64, 8
    logits = randn(n, V, device, seed=1)
    greedy_rows = [0, 3, 4, 7]
    for r in range(n):
        if r not in greedy_rows:
            logits[r] = 0.0  # uniform: the random rows must actually vary
    params = [SamplingParams(temperature=0.0 if r in greedy_rows else 1.0, top_k=5) for r in range(n)]
    md = build(params, device, V)
    assert not md.all_greedy and not md.all_random
    seen = {r: set() for r in range(n)}
    for _ in range(20):
        out = SAMPLER(logits, md).sampled_token_ids.cpu()
        for r in range(n):
            seen[r].add(int(out[r]))
    argmax = logits.argmax(-1).cpu()
    for r in greedy_rows:
        assert seen[r] == {int(argmax[r])}
    for r in set(range(n)) - set(greedy_rows):
        assert len(seen[r]) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    md = build([], device, 10)
    out = SAMPLER(torch.zeros(0, 10, device=device), md)
    assert out.sampled_token_ids.shape == (0,)


# ------------------------------------------------------------------------------------- seeds


def test_make_generator_deterministic():
    a = torch.rand(5, generator=make_generator(7, 3, "cpu"))
    b = torch.rand(5, generator=make_generator(7, 3, "cpu"))
    c = torch.rand(5, generator=make_generator(7, 4, "cpu"))
    d = torch.rand(5, generator=make_generator(8, 3, "cpu"))
    g = torch.Generator()
    e = torch.rand(5, generator=make_generator(7, 3, "cpu", out=g))
    assert torch.equal(a, b) and torch.equal(a, e)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def _run_seeded(device, V, logits_row, seed, steps, batch_maker):
    """Sample `steps` tokens for a seeded request placed in a batch built by batch_maker(step)."""
    toks = []
    out_ids: list[int] = []
    for step in range(steps):
        others, pos = batch_maker(step)
        params = [p for p, _ in others]
        rows = [lg for _, lg in others]
        params.insert(pos, SamplingParams(temperature=0.8, top_p=0.95, seed=seed))
        rows.insert(pos, logits_row)
        outputs = [[] for _ in params]
        outputs[pos] = list(out_ids)
        md = build(params, device, V, outputs=outputs)
        tok = int(SAMPLER(torch.stack(rows), md).sampled_token_ids[pos])
        toks.append(tok)
        out_ids.append(tok)
    return toks


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_independent_of_batch(device):
    V = 200
    base = randn(1, V, device, seed=3)[0] * 0.5
    alone = _run_seeded(device, V, base, 1234, 12, lambda step: ([], 0))
    again = _run_seeded(device, V, base, 1234, 12, lambda step: ([], 0))
    assert alone == again
    assert len(set(alone)) > 1  # it does sample

    def crowded(step):
        others = [
            (SamplingParams(temperature=1.0), randn(1, V, device, seed=step)[0]),
            (SamplingParams(temperature=0.0), randn(1, V, device, seed=50 + step)[0]),
            (SamplingParams(temperature=0.7, seed=99, top_k=3), randn(1, V, device, seed=9)[0]),
            (SamplingParams(temperature=1.3, min_p=0.1, presence_penalty=0.5), randn(1, V, device, seed=8)[0]),
        ][: 1 + step % 4]
        return others, step % (len(others) + 1)

    assert _run_seeded(device, V, base, 1234, 12, crowded) == alone


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_differ(device):
    V = 1000
    flat = torch.zeros(V, device=device)
    a = _run_seeded(device, V, flat, 1, 10, lambda s: ([], 0))
    b = _run_seeded(device, V, flat, 2, 10, lambda s: ([], 0))
    # P(two uniform draws over 1000 tokens collide) = 1e-3 per step
    assert sum(x == y for x, y in zip(a, b)) <= 2
    assert len(set(a)) >= 8  # successive steps of one seed are not stuck


@pytest.mark.parametrize("device", DEVICES)
def test_default_generator_makes_unseeded_rows_reproducible(device):
    V, n = 300, 6
    logits = torch.zeros(n, V, device=device)
    params = [SamplingParams(temperature=1.0)] * n

    def run():
        g = torch.Generator(device=device).manual_seed(42)
        md = SamplingMetadata.build(params, [[]] * n, [[]] * n, [None] * n, V, device, [0], default_generator=g)
        return [SAMPLER(logits, md).sampled_token_ids.tolist() for _ in range(3)]

    a, b = run(), run()
    assert a == b and a[0] != a[1]


@pytest.mark.parametrize("device", DEVICES)
def test_exponential_race_matches_distribution(device):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = probs.log().expand(n, 4).contiguous().to(device)
    md = build([SamplingParams(temperature=1.0)] * n, device, 4)
    freq = torch.bincount(SAMPLER(logits, md).sampled_token_ids.cpu(), minlength=4).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.035), freq


# ------------------------------------------------------------------------------------- filters


def _allowed(logits64: torch.Tensor, temp: float, k: int, p: float, min_p: float, tol: float) -> torch.Tensor:
    """Reference allowed set for one row, computed independently in float64.

    tol > 0: permissive (borderline tokens allowed); tol < 0: strict (borderline tokens excluded).
    """
    l = logits64 / temp
    V = l.shape[0]
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < k < V:
        kth = l.sort(descending=True).values[k - 1]
        keep &= l >= kth
    if p < 1.0:
        pr = torch.where(keep, l, -math.inf).softmax(0)
        order = pr.argsort(descending=True)
        cum_before = pr[order].cumsum(0) - pr[order]
        kp = torch.zeros(V, dtype=torch.bool)
        kp[order] = cum_before < p + tol
        kp[order[0]] = True
        keep &= kp
    if min_p > 0.0:
        lm = torch.where(keep, l, -math.inf)
        ratio = (lm - lm.max()).exp()
        keep &= ratio >= min_p - tol
    return keep


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**31 - 1),
    V=st.integers(2, 48),
    scale=st.floats(0.1, 6.0),
    temp=st.floats(0.1, 3.0),
    k=st.integers(0, 50),
    p=st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
)
@pytest.mark.parametrize("device", DEVICES)
def test_filters_only_emit_allowed_tokens(device, seed, V, scale, temp, k, p, min_p):
    row = randn(1, V, "cpu", seed=seed, scale=scale)[0]
    sp = SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=min_p)
    loose = _allowed(row.double(), temp, k, p, min_p, tol=1e-4)
    strict = _allowed(row.double(), temp, k, p, min_p, tol=-1e-4)

    # 1) the filter helpers keep a set between the strict and the permissive reference
    md = build([sp], device, V)
    lg = row.to(device).unsqueeze(0) / temp
    lg = apply_top_k_top_p(lg, md.top_k, md.top_p, md.max_top_k, md.top_k_all_rows)
    if md.min_p is not None:
        lg = apply_min_p(lg, md.min_p)
    kept = torch.isfinite(lg[0]).cpu()
    assert bool((kept <= loose).all()) and bool((strict <= kept).all())

    # 2) many draws in one batch (plus a greedy row) only ever emit allowed tokens
    R = 64
    params = [sp] * R + [SamplingParams(temperature=0.0)]
    logits = row.expand(R + 1, V).contiguous().to(device)
    out = SAMPLER(logits, build(params, device, V)).sampled_token_ids.cpu()
    assert bool(loose[out[:R]].all())
    assert int(out[R]) == int(row.argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_exact(device):
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0]] * 3, device=device)
    md = build(
        [SamplingParams(top_k=2), SamplingParams(top_k=0), SamplingParams(top_k=4, top_p=1.0)], device, 6
    )
    out = apply_top_k_top_p(logits.clone(), md.top_k, md.top_p, md.max_top_k)
    kept = torch.isfinite(out).cpu()
    assert kept[0].tolist() == [False, True, False, True, False, False]
    assert kept[1].all()
    assert kept[2].tolist() == [False, True, False, True, True, True]
    # with top_p active (sort path) the top-k part must agree
    md2 = build([SamplingParams(top_k=2, top_p=0.999999)], device, 6)
    assert md2.top_k_all_rows
    for fast in (False, True):
        out2 = apply_top_k_top_p(logits[:1].clone(), md2.top_k, md2.top_p, md2.max_top_k, fast)
        assert torch.isfinite(out2).cpu()[0].tolist() == kept[0].tolist()
    # a tiny top_p still keeps the most likely token (and only it)
    md3 = build([SamplingParams(top_p=1e-9)], device, 6)
    out3 = apply_top_k_top_p(logits[:1].clone(), md3.top_k, md3.top_p, md3.max_top_k)
    assert torch.isfinite(out3).cpu()[0].tolist() == [False, True, False, False, False, False]


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_fast_path_matches_sort_path(device):
    n, V = 32, 500
    logits = randn(n, V, device, seed=21, scale=3.0)
    g = torch.Generator().manual_seed(0)
    params = [
        SamplingParams(
            temperature=1.0,
            top_k=int(torch.randint(1, 120, (1,), generator=g)),
            top_p=float(torch.rand(1, generator=g)) * 0.99 + 0.01,
        )
        for _ in range(n)
    ]
    md = build(params, device, V)
    assert md.top_k_all_rows
    slow = apply_top_k_top_p(logits.clone(), md.top_k, md.top_p, md.max_top_k, False)
    fast = apply_top_k_top_p(logits.clone(), md.top_k, md.top_p, md.max_top_k, True)
    assert torch.equal(torch.isfinite(slow), torch.isfinite(fast))
    assert torch.equal(slow[torch.isfinite(slow)], fast[torch.isfinite(fast)])
    # a row without top_k (random) turns the fast path off
    assert not build(params + [SamplingParams(top_p=0.5)], device, V).top_k_all_rows
    assert build(params + [SamplingParams(temperature=0.0)], device, V).top_k_all_rows


# ------------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("device", DEVICES)
def test_apply_penalties_by_hand(device):
    V = 6
    logits = torch.tensor(
        [[2.0, -1.0, 0.5, 3.0, -2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.0, 0.0, 0.0]],
        device=device,
    )
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(frequency_penalty=-0.5),
        SamplingParams(),  # no penalties: untouched even though it has history
    ]
    outputs = [[3, 3, 2], [5, 5, 5, 1, V + 2], [0, 1, 2]]  # out-of-vocab ids are ignored
    prompts = [[0, 4, 0, V], [2, 3], [1]]
    md = build(params, device, V, outputs=outputs, prompts=prompts)
    assert md.prompt_token_mask is not None
    assert md.output_token_counts.cpu().tolist() == [[0, 0, 1, 2, 0, 0], [0, 1, 0, 0, 0, 3], [0] * 6]
    assert md.prompt_token_mask.cpu().tolist()[0] == [True, False, False, False, True, False]
    # numpy arrays / tensors are accepted as token sequences and give the same tensors
    md_np = build(
        params, device, V, outputs=[np.array(o) for o in outputs], prompts=[torch.tensor(p) for p in prompts]
    )
    assert torch.equal(md_np.output_token_counts, md.output_token_counts)
    assert torch.equal(md_np.prompt_token_mask, md.prompt_token_mask)
    got = apply_penalties(
        logits.clone(),
        md.prompt_token_mask,
        md.output_token_counts,
        md.presence_penalties,
        md.frequency_penalties,
        md.repetition_penalties,
    )
    # row 0: t0 prompt 2/2=1; t1 unseen; t2 0.5/2-0.5-0.25=-0.5; t3 3/2-1.0-0.25=0.25; t4 prompt -2*2=-4
    # row 1: t1 1+0.5=1.5; t5 1+1.5=2.5 (rp 1: prompt tokens unchanged)
    exp = torch.tensor(
        [[1.0, -1.0, -0.5, 0.25, -4.0, 0.0], [1.0, 1.5, 1.0, 1.0, 1.0, 2.5], [1.0, -1.0, 2.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(got.cpu(), exp)

    # direct call with hand-built tensors and no prompt mask
    got2 = apply_penalties(
        torch.tensor([[-3.0, 4.0, 1.0]]),
        None,
        torch.tensor([[1, 2, 0]], dtype=torch.int32),
        torch.tensor([1.0]),
        torch.tensor([0.0]),
        torch.tensor([1.5]),
    )
    torch.testing.assert_close(got2, torch.tensor([[-3.0 * 1.5 - 1.0, 4.0 / 1.5 - 1.0, 1.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_change_greedy_choice(device):
    logits = torch.tensor([[3.0, 2.9, 0.0]], device=device)
    md = build([SamplingParams(temperature=0.0, presence_penalty=0.5)], device, 3, outputs=[[0]])
    assert int(SAMPLER(logits, md).sampled_token_ids[0]) == 1
    md = build([SamplingParams(temperature=0.0, repetition_penalty=1.2)], device, 3, prompts=[[0]])
    assert int(SAMPLER(logits, md).sampled_token_ids[0]) == 1
    md = build([SamplingParams(temperature=0.0)], device, 3, outputs=[[0]])
    assert md.output_token_counts is None
    assert int(SAMPLER(logits, md).sampled_token_ids[0]) == 0


# ------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw(device):
    V, n = 40, 5
    logits = randn(n, V, device, seed=11, scale=2.0)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, logprobs=0, top_k=10),
        SamplingParams(temperature=1.0),  # no logprobs
        SamplingParams(temperature=0.5, logprobs=2, logit_bias={7: 100.0}, presence_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=1, repetition_penalty=1.5),
    ]
    md = build(params, device, V, outputs=[[1], [2], [3], [4], [int(logits[4].argmax())]])
    assert md.max_num_logprobs == 3
    out = SAMPLER(logits, md)
    ref = torch.log_softmax(logits.double(), -1).cpu()
    tok = out.sampled_token_ids.cpu()
    assert int(tok[3]) == 7  # forced by the bias, but its logprob stays the raw one
    assert out.logprobs.shape == (n, 4) and out.logprob_token_ids.shape == (n, 4)
    lp, ids, ranks = out.logprobs.cpu().double(), out.logprob_token_ids.cpu(), out.ranks.cpu()
    assert torch.equal(ids[:, 0], tok)
    torch.testing.assert_close(lp[:, 0], ref.gather(1, tok[:, None])[:, 0], atol=1e-5, rtol=0)
    top = ref.topk(3, -1)
    assert torch.equal(ids[:, 1:], top.indices)
    torch.testing.assert_close(lp[:, 1:], top.values, atol=1e-5, rtol=0)
    exp_rank = 1 + (ref > ref.gather(1, tok[:, None])).sum(-1)
    assert torch.equal(ranks, exp_rank)
    assert int(ranks[0]) == 1

    tl = out.cpu().to_token_logprobs([p.logprobs for p in params])
    assert tl[2] is None
    assert tl[1].top_token_ids == [] and tl[1].token_id == int(tok[1])
    assert tl[0].top_token_ids == top.indices[0].tolist() and tl[0].rank == 1
    assert len(tl[3].top_logprobs) == 2 and tl[3].token_id == 7
    assert tl[3].logprob == pytest.approx(float(ref[3, 7]), abs=1e-5)


# ------------------------------------------------------------------------------------- bias / min_tokens


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias(device):
    V = 30
    logits = randn(4, V, device, seed=5)
    am = logits.argmax(-1).cpu()
    params = [
        SamplingParams(temperature=1.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={int(am[1]): -100.0}),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={3: 100.0, V + 5: 1.0}),  # out-of-vocab id ignored
    ]
    md = build(params, device, V)
    for _ in range(5):
        out = SAMPLER(logits, md).sampled_token_ids.cpu()
        assert int(out[0]) == 7
        assert int(out[1]) != int(am[1])
        assert int(out[2]) == int(am[2])
        assert int(out[3]) == 3
    md2 = build(params[2:3], device, V)
    assert md2.logit_bias is None


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_ban(device):
    V, eos = 10, 0
    logits = torch.zeros(5, V, device=device)
    logits[:, eos] = 50.0
    logits[:, 4] = 40.0  # a stop token id for some rows
    logits[:, 6] = 30.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=3),  # 1 output: eos banned
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[4]),  # eos and 4 banned
        SamplingParams(temperature=0.0, min_tokens=2),  # 2 outputs: reached, eos allowed
        SamplingParams(temperature=0.0, min_tokens=5, ignore_eos=True, stop_token_ids=[4]),  # only 4 banned
        SamplingParams(temperature=0.0, stop_token_ids=[4]),  # no min_tokens
    ]
    outputs = [[1], [1], [1, 2], [], []]
    md = build(params, device, V, outputs=outputs, eos=[eos])
    out = SAMPLER(logits, md).sampled_token_ids.cpu().tolist()
    assert out == [4, 6, eos, eos, eos]


# ------------------------------------------------------------------------------------- GPU syncs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fast_top_k", [False, True])
def test_no_host_sync_on_cuda(fast_top_k):
    dev = "cuda"
    V = 128
    params = [
        SamplingParams(temperature=0.0, logprobs=2, presence_penalty=0.3),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05, seed=3, logit_bias={1: 2.0}),
        SamplingParams(
            temperature=1.2, top_k=7 if fast_top_k else 0, top_p=0.8, min_tokens=4, repetition_penalty=1.1, logprobs=0
        ),
    ]
    outputs = [[1, 2], [3], [4, 4]]
    prompts = [[5], [6], [7]]
    logits = torch.randn(3, V, device=dev)
    default = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gens = [None, make_generator(3, 1, dev), None]
        md = SamplingMetadata.build(params, outputs, prompts, gens, V, dev, [0], default_generator=default)
        out = SAMPLER(logits, md)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert md.top_k_all_rows == fast_top_k
    assert out.sampled_token_ids.shape == (3,)
