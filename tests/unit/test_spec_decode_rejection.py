"""The rejection sampler reproduces the target distribution (statistical, fixed seeds), for a
point-mass draft (prompt lookup) and a full draft distribution q (draft model); greedy is exact."""
from __future__ import annotations

import torch

from engine_core.spec_decode.rejection_sampler import rejection_sample

N = 20_000  # draws; TV distance noise ~ sqrt(V / N) / 2 ~ 0.01
P1 = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.15, 0.05])
P2 = torch.tensor([0.30, 0.05, 0.05, 0.20, 0.10, 0.30])
P3 = torch.tensor([0.10, 0.10, 0.10, 0.10, 0.10, 0.50])
Q1 = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.10, 0.10])
Q2 = torch.tensor([0.05, 0.05, 0.60, 0.10, 0.10, 0.10])


def _tv(samples: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=p.numel()).float()
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def _target(num_drafts: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_req = torch.stack([P1, P2, P3][: num_drafts + 1])
    probs = per_req.repeat(N, 1)
    return probs, probs.argmax(dim=1)


def test_point_mass_draft_reproduces_target():
    g = torch.Generator().manual_seed(0)
    drafts = [[1, 0]] * N  # d1 = the likely token, d2 = an unlikely one
    probs, argmax = _target(2)
    out = rejection_sample(drafts, probs, argmax, [False] * N, None, None, g)
    assert all(1 <= len(o) <= 3 for o in out)
    assert _tv([o[0] for o in out], P1) < 0.02
    second = [o[1] for o in out if len(o) > 1]  # the first token was d1 = 1: next one ~ P2
    assert len(second) > 0.3 * N and _tv(second, P2) < 0.025
    third = [o[2] for o in out if len(o) > 2]  # both accepted: the bonus ~ P3
    assert len(third) > 500 and _tv(third, P3) < 0.05


def test_full_draft_distribution_reproduces_target():
    g = torch.Generator().manual_seed(1)
    d1 = torch.multinomial(Q1, N, replacement=True, generator=g)
    d2 = torch.multinomial(Q2, N, replacement=True, generator=g)
    drafts = [[int(a), int(b)] for a, b in zip(d1, d2)]
    q = torch.stack([Q1, Q2])
    probs, argmax = _target(2)
    out = rejection_sample(drafts, probs, argmax, [False] * N, [q] * N, None, g)
    assert _tv([o[0] for o in out], P1) < 0.02
    second = [o[1] for o in out if len(o) > 1]
    assert len(second) > 0.2 * N and _tv(second, P2) < 0.03
    # Acceptance of d1 is sum_x min(p, q) = 1 - TV(p, q) (the theory's rate).
    acc = sum(len(o) > 1 for o in out) / N
    assert abs(acc - float(torch.minimum(P1, Q1).sum())) < 0.02


def test_uneven_drafts_and_no_drafts():
    g = torch.Generator().manual_seed(2)
    drafts = [[], [3], [1, 0]] * (N // 3)
    rows = []
    for d in drafts:
        rows += [P1, P2, P3][: len(d) + 1]
    probs = torch.stack(rows)
    out = rejection_sample(drafts, probs, probs.argmax(1), [False] * len(drafts), None, None, g)
    for k in range(3):
        assert _tv([o[0] for o in out[k::3]], P1) < 0.03


def test_greedy_accepts_exactly_the_argmax():
    probs = torch.stack([P1, P2, P3, P1, P2, P3])
    argmax = probs.argmax(1)  # 1, 0, 5
    out = rejection_sample([[1, 0], [1, 4]], None, argmax, [True, True])
    assert out == [[1, 0, 5], [1, 0]]
    out = rejection_sample([[2, 0]], None, argmax[:3], [True])
    assert out == [[1]]


def test_seeded_requests_are_reproducible():
    probs, argmax = _target(2)
    probs, argmax = probs[:3 * 4], argmax[:3 * 4]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8, 9, 10)]
    a = rejection_sample([[1, 0]] * 4, probs, argmax, [False] * 4, None, gens())
    b = rejection_sample([[1, 0]] * 4, probs, argmax, [False] * 4, None, gens())
    assert a == b
