"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023; vLLM's RejectionSampler).

For request i with drafts d_1..d_n (drawn from draft distributions q_j) and the target's
distributions p_1..p_{n+1} at the n+1 verified positions:
  - accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), left to right;
  - at the first rejection j, emit a token from norm(max(0, p_j - q_j)) and stop;
  - if all n are accepted, emit a bonus token from p_{n+1}.
Every emitted token is then distributed exactly as the target would have sampled it. Prompt lookup
has no draft distribution: q_j is a point mass on d_j, so acceptance is p_j(d_j) and the residual is
p_j with d_j removed. Greedy rows (temperature 0) accept d_j iff it is the target's argmax and emit
the argmax: token-identical to decoding without speculation.

p_j is the *processed* target distribution (logit_bias, min_tokens, penalties counting the earlier
drafts as output, temperature, top-k/p, min-p), see `target_distribution`.
"""
from __future__ import annotations

import torch

from engine_core.layers.sampler import apply_min_p, apply_penalties, apply_top_k_top_p
from engine_core.sampling_metadata import SamplingMetadata

_NEG_INF = float("-inf")


def target_distribution(logits: torch.Tensor, md: SamplingMetadata) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sampler's processing of [M, V] logits, stopping short of the draw: (probs [M, V] float32,
    None when every row is greedy; argmax [M] of the processed logits, the greedy rows' token)."""
    logits = logits.to(torch.float32, copy=True)
    if md.logit_bias is not None:
        logits += md.logit_bias
    if md.min_tokens_ban is not None:
        logits.index_put_(md.min_tokens_ban, logits.new_full((), _NEG_INF))
    if md.output_token_counts is not None:
        logits = apply_penalties(logits, md.prompt_token_mask, md.output_token_counts,
                                 md.presence_penalties, md.frequency_penalties, md.repetition_penalties)
    argmax = logits.argmax(dim=-1)
    if md.all_greedy:
        return None, argmax
    temp = torch.where(md.temperature > 0, md.temperature, 1.0)
    logits.div_(temp.unsqueeze(1))
    logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k, md.top_k_all_rows)
    if md.min_p is not None:
        logits = apply_min_p(logits, md.min_p)
    return logits.softmax(dim=-1), argmax


def rejection_sample(
    draft_token_ids: list[list[int]],
    target_probs: torch.Tensor | None,
    target_argmax: torch.Tensor,
    greedy: list[bool],
    draft_probs: list[torch.Tensor | None] | None = None,
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Verify N requests' drafts; returns each request's emitted tokens (accepted drafts + one).

    draft_token_ids[i]: request i's n_i >= 0 drafts. target_probs / target_argmax: [sum(n_i + 1), V]
    / [sum(n_i + 1)], request i's n_i + 1 rows contiguous, in request order (probs may be None when
    every request is greedy). draft_probs[i]: [>= n_i, V] q of request i's drafts, or None for a point
    mass (prompt lookup). generators[i]: request i's seeded generator (None: default_generator)."""
    N = len(draft_token_ids)
    if N == 0:
        return []
    dev = target_argmax.device
    n = torch.tensor([len(d) for d in draft_token_ids], dtype=torch.int64)
    K = int(n.max())
    starts = torch.cumsum(n + 1, 0) - (n + 1)  # first row of each request
    pos = torch.arange(K + 1)
    valid = pos[None, :] <= n[:, None]  # [N, K+1] rows that exist
    flat = torch.where(valid, starts[:, None] + pos[None, :], 0).to(dev)  # padded -> row 0 (masked)
    drafts = torch.zeros(N, max(K, 1), dtype=torch.int64)
    for i, d in enumerate(draft_token_ids):
        if d:
            drafts[i, : len(d)] = torch.tensor(d, dtype=torch.int64)
    drafts = drafts[:, :K].to(dev)
    n_dev, valid_draft = n.to(dev), valid[:, :K].to(dev) & (pos[None, :K] < n[:, None]).to(dev)
    argmax = target_argmax[flat]  # [N, K+1]
    greedy_t = torch.tensor(greedy, dtype=torch.bool, device=dev)
    all_greedy = all(greedy)

    # Uniforms for the accept tests and Exp(1) draws for the final token: from each seeded
    # request's own generator, the rest from one shared draw.
    u = torch.rand(N, max(K, 1), device=dev, generator=default_generator)[:, :K] if not all_greedy else None
    if u is not None and generators is not None:
        for i, g in enumerate(generators):
            if g is not None and not greedy[i]:
                u[i] = torch.rand(K, device=dev, generator=g)

    accept = drafts == argmax[:, :K]  # greedy rule
    if not all_greedy:
        P = target_probs[flat]  # [N, K+1, V]
        p_d = P[:, :K].gather(2, drafts.unsqueeze(2)).squeeze(2)
        q_d = torch.ones_like(p_d)
        if draft_probs is not None:
            for i, q in enumerate(draft_probs):
                if q is not None and len(draft_token_ids[i]):
                    k_i = len(draft_token_ids[i])
                    q_d[i, :k_i] = q[:k_i].gather(1, drafts[i, :k_i].unsqueeze(1)).squeeze(1)
        # u < p/q  <=>  u * q < p  (accepts with probability min(1, p/q); p == 0 never accepts)
        accept = torch.where(greedy_t[:, None], accept, u * q_d < p_d)
    accept &= valid_draft
    num_accepted = torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1) if K else torch.zeros_like(n_dev)

    ar = torch.arange(N, device=dev)
    final = argmax[ar, num_accepted]  # greedy rows: the argmax at the first rejected / bonus position
    if not all_greedy:
        dist = P[ar, num_accepted].clone()  # [N, V]: p at that position
        rejected = num_accepted < n_dev
        if rejected.any():
            # Point mass (prompt lookup): p with the rejected draft removed, for all rows at once.
            rows = torch.nonzero(rejected).squeeze(1)
            dj = drafts[rows, num_accepted[rows]]
            dist[rows, dj] = 0.0
            if draft_probs is not None:  # a full q: max(0, p - q) (its p(d_j) was not zeroed above)
                for i in rows.tolist():
                    q = draft_probs[i]
                    if q is not None:
                        j = int(num_accepted[i])
                        dist[i] = (P[i, j] - q[j].to(dist.dtype)).clamp_(min=0.0)
            # max(0, p - q) sums to 0 only if p == q, where rejection has probability 0 (float
            # round-off aside): fall back to p.
            empty = dist.sum(dim=1) <= 0
            if empty.any():
                dist[empty] = P[ar, num_accepted][empty]
        e = torch.empty_like(dist).exponential_(generator=default_generator)
        if generators is not None:
            for i, g in enumerate(generators):
                if g is not None and not greedy[i]:
                    e[i].exponential_(generator=g)
        e.clamp_(min=torch.finfo(e.dtype).tiny)
        sampled = (dist / e).argmax(dim=1)  # exponential race: a draw from dist (unnormalised is fine)
        final = torch.where(greedy_t, final, sampled)

    acc = num_accepted.tolist()
    fin = final.tolist()
    return [list(draft_token_ids[i][: acc[i]]) + [fin[i]] for i in range(N)]
