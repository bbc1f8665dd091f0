"""Batched GPU sampler (vLLM v1 semantics), free of device->host syncs.

Order per step:
  1. logprobs (if any row asks) from the RAW logits: log_softmax before any processing
     (vLLM's default ``raw_logprobs``); rank = #tokens with logprob >= the sampled one's.
  2. logit_bias, then the min_tokens ban (eos/stop ids -> -inf), then penalties
     (repetition, frequency, presence; see ``apply_penalties``).
  3. greedy rows (temperature 0): argmax.
  4. random rows: / temperature, top-k, top-p, min-p, softmax, then the exponential race
     argmax(probs / q), q ~ Exp(1). q of a seeded row comes from that row's own generator, so its
     token depends only on (its logits, its generator), never on the other rows of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine_core.sampling_metadata import SamplingMetadata, make_generator

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k_only",
    "apply_top_k_top_p",
    "gather_logprobs",
    "make_generator",
    "random_sample",
]
from engine_core.scheduler_output import TokenLogprobs

_NEG_INF = float("-inf")
_TOPK_FAST_MAX = 1024  # top-k + top-p via topk(max_top_k) instead of a full vocab sort


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N, K+1] float32; col 0 = sampled token, 1..K = top-K
    logprob_token_ids: torch.Tensor | None = None  # [N, K+1] int64
    ranks: torch.Tensor | None = None  # [N] int64, 1-based rank of the sampled token

    def to_token_logprobs(self, num_logprobs: list[int | None]) -> list[TokenLogprobs | None]:
        """Host conversion for ModelRunnerOutput: row i keeps its own top-``num_logprobs[i]``.

        Call on CPU tensors (move the whole output with one ``.cpu()`` first): ``tolist`` syncs.
        """
        if self.logprobs is None:
            return [None] * len(num_logprobs)
        toks = self.sampled_token_ids.tolist()
        lps = self.logprobs.tolist()
        ids = self.logprob_token_ids.tolist()
        ranks = self.ranks.tolist()
        out: list[TokenLogprobs | None] = []
        for i, k in enumerate(num_logprobs):
            if k is None:
                out.append(None)
                continue
            out.append(
                TokenLogprobs(
                    token_id=toks[i],
                    logprob=lps[i][0],
                    rank=ranks[i],
                    top_token_ids=ids[i][1 : 1 + k],
                    top_logprobs=lps[i][1 : 1 + k],
                )
            )
        return out

    def cpu(self) -> SamplerOutput:
        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.cpu()

        return SamplerOutput(c(self.sampled_token_ids), c(self.logprobs), c(self.logprob_token_ids), c(self.ranks))


# ---------------------------------------------------------------------------------------------
# Logits processors. Each returns the processed logits; it may modify ``logits`` in place.
# ---------------------------------------------------------------------------------------------


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_mask: torch.Tensor | None,
    output_token_counts: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    repetition_penalties: torch.Tensor,
) -> torch.Tensor:
    """vLLM/HF penalties on [N, V] logits.

    repetition (tokens in prompt or output): logit > 0 ? logit / rp : logit * rp
    frequency: logit -= fp * count(output);  presence: logit -= pp * (count(output) > 0)
    """
    output_mask = output_token_counts > 0
    seen = output_mask if prompt_token_mask is None else (output_mask | prompt_token_mask)
    rp = torch.where(seen, repetition_penalties.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / rp, logits * rp)
    logits -= frequency_penalties.unsqueeze(1) * output_token_counts
    logits -= presence_penalties.unsqueeze(1) * output_mask
    return logits


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep tokens whose logit >= the row's k-th largest (ties at the threshold are kept). k=0: off."""
    V = logits.shape[1]
    kmax = min(max(max_top_k, 1), V)
    top_vals = logits.topk(kmax, dim=-1).values
    kth = top_vals.gather(1, (top_k.clamp(1, kmax) - 1).unsqueeze(1))
    kth = torch.where((top_k > 0).unsqueeze(1), kth, _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int = 0,
    top_k_all_rows: bool = False,
) -> torch.Tensor:
    """top-k (k=0 off) then top-p (keep the smallest set of most likely tokens whose probability
    sums to >= p, always the top token; p=1 off) over the top-k-renormalized distribution.

    ``top_k_all_rows``: every row that matters has k > 0 (rows with k=0 may then be filtered
    arbitrarily: greedy rows). Then top-p only needs the top-``max_top_k`` tokens, not a full sort.
    """
    if top_p is None:
        if top_k is None:
            return logits
        return apply_top_k_only(logits, top_k, max_top_k)
    V = logits.shape[1]
    if top_k is not None and top_k_all_rows and 0 < max_top_k <= _TOPK_FAST_MAX and max_top_k < V:
        vals, idx = logits.topk(max_top_k, dim=-1)  # descending
        pos = torch.arange(max_top_k, device=logits.device)
        # k-th largest, so ties at the threshold are kept as in the other paths
        kth = vals.gather(1, (top_k.clamp(1, max_top_k) - 1).unsqueeze(1))
        vals.masked_fill_(vals < kth, _NEG_INF)
        probs = vals.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop = (mass_before >= top_p.unsqueeze(1)) & (pos > 0)
        vals.masked_fill_(drop, _NEG_INF)
        return logits.fill_(_NEG_INF).scatter_(1, idx, vals)
    logits_sort, idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        pos = (V - torch.where(top_k > 0, top_k, V).clamp(max=V)).unsqueeze(1)
        kth = logits_sort.gather(1, pos)
        logits_sort.masked_fill_(logits_sort < kth, _NEG_INF)
    probs_sort = logits_sort.softmax(dim=-1)
    cum = probs_sort.cumsum(dim=-1)  # ascending: mass of this token and all less likely ones
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    logits_sort.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, idx, logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * max_prob, i.e. logit < max_logit + log(min_p). 0: off."""
    thresh = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill_(logits < thresh, _NEG_INF)


def random_sample(
    probs: torch.Tensor,
    generators: dict[int, torch.Generator],
    default_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exponential race: argmax(probs / q), q ~ Exp(1) i.i.d. == sampling from probs.

    Seeded rows draw q from their own generator (one small kernel each); the rest share one draw
    from ``default_generator`` (None: torch's global RNG). No torch.multinomial, no host sync.
    Modifies ``probs`` in place.
    """
    n = probs.shape[0]
    q = torch.empty_like(probs)
    if len(generators) < n:
        q.exponential_(generator=default_generator)
    for i, g in generators.items():
        q[i].exponential_(generator=g)
    q.clamp_(min=torch.finfo(q.dtype).tiny)  # guard against q == 0 (0/0 -> nan)
    return probs.div_(q).argmax(dim=-1)


def gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, k+1] logprobs and ids (col 0: the sampled token, then the top-k) and 1-based ranks."""
    token_ids = token_ids.unsqueeze(1)
    sampled_lp = raw_logprobs.gather(1, token_ids)
    ranks = (raw_logprobs >= sampled_lp).sum(dim=-1)
    if k > 0:
        top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
        return torch.cat([sampled_lp, top_lp], 1), torch.cat([token_ids, top_ids], 1), ranks
    return sampled_lp, token_ids, ranks


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """logits: [N, V] (any float dtype; processed in float32, never modified in place)."""
        raw = logits
        if (md.all_greedy and md.max_num_logprobs is None and md.logit_bias is None
                and md.min_tokens_ban is None and md.output_token_counts is None):
            # Plain greedy (the common serving case): nothing modifies the logits, so no copy.
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1).to(torch.int64))
        # Our own float32 copy: every processor below may work in place.
        logits = logits.to(torch.float32, copy=True)

        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(raw.float(), dim=-1)

        if md.logit_bias is not None:
            logits += md.logit_bias
        if md.min_tokens_ban is not None:
            logits.index_put_(md.min_tokens_ban, logits.new_full((), _NEG_INF))
        if md.output_token_counts is not None:
            logits = apply_penalties(
                logits,
                md.prompt_token_mask,
                md.output_token_counts,
                md.presence_penalties,
                md.frequency_penalties,
                md.repetition_penalties,
            )

        greedy_ids = None
        if not md.all_random:
            greedy_ids = logits.argmax(dim=-1)

        if md.all_greedy:
            sampled = greedy_ids
        else:
            temp = md.temperature
            if not md.all_random:
                temp = torch.where(temp > 0, temp, 1.0)  # greedy rows: avoid / 0 (result unused)
            logits.div_(temp.unsqueeze(1))
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k, md.top_k_all_rows)
            if md.min_p is not None:
                logits = apply_min_p(logits, md.min_p)
            probs = logits.softmax(dim=-1)
            sampled = random_sample(probs, md.generators, md.default_generator)
            if greedy_ids is not None:
                sampled = torch.where(md.temperature > 0, sampled, greedy_ids)

        sampled = sampled.to(torch.int64)
        if raw_logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled)
        lps, ids, ranks = gather_logprobs(raw_logprobs, sampled, md.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=lps, logprob_token_ids=ids, ranks=ranks)
