"""Draft-model proposer: a small model with the target's vocabulary, run by the same executor on its
own paged KV cache. It uses the target's block tables (same block ids, same positions), so it needs
no allocator of its own: every target forward is mirrored on the draft (its KV then holds every
computed token, prefix-cache hits included, since a cached block was computed by both), and after
sampling it decodes k tokens autoregressively from the new last token. Those k passes write KV at
the k positions after the verified ones: the scheduler allocates them (num_lookahead_slots)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine_core.layers.attention_metadata import AttentionMetadata
from engine_core.sampling_metadata import make_generator
from engine_core.sampling_params import GREEDY_EPS, SamplingParams

# Draft draws use their own stream: a seeded request's target draws stay (seed, position)-keyed.
_DRAFT_SEED_SALT = 0x5EC0DE


@dataclass
class DraftRequest:
    """One request to draft for: its newest token (not in the KV cache yet) at `position`."""

    last_token: int
    position: int
    block_table: np.ndarray  # [num_blocks] int32, the request's blocks
    num_drafts: int  # <= k, capped by its allocated slots, max_tokens and max_model_len
    params: SamplingParams
    num_output_tokens: int


class DraftModelProposer:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 num_speculative_tokens: int, device: torch.device, generator: torch.Generator) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_speculative_tokens = num_speculative_tokens
        self.device = device
        self.generator = generator

    def mirror(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> None:
        """Run the draft on the target's step inputs, so its KV cache holds the same tokens."""
        self.model(input_ids, positions, self.kv_caches, md)

    def propose(self, reqs: list[DraftRequest]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Per request: its drafts and, for a sampled (temperature > 0) request, their draft
        distributions q [num_drafts, V] (None for greedy: the target's argmax decides alone)."""
        drafts: list[list[int]] = [[] for _ in reqs]
        qs: list[list[torch.Tensor]] = [[] for _ in reqs]
        greedy = [r.params.temperature < GREEDY_EPS for r in reqs]
        gens = [None if g or r.params.seed is None else
                make_generator(r.params.seed ^ _DRAFT_SEED_SALT, r.num_output_tokens, self.device)
                for r, g in zip(reqs, greedy)]
        last = [r.last_token for r in reqs]
        bs = self.block_size
        for j in range(max((r.num_drafts for r in reqs), default=0)):
            act = [i for i, r in enumerate(reqs) if r.num_drafts > j]
            pos = np.array([reqs[i].position + j for i in act], dtype=np.int64)
            need = pos // bs + 1
            tables = np.zeros((len(act), int(need.max())), dtype=np.int32)
            for a, i in enumerate(act):
                tables[a, : need[a]] = reqs[i].block_table[: need[a]]
            slots = tables[np.arange(len(act)), pos // bs].astype(np.int64) * bs + pos % bs
            seq = (pos + 1).astype(np.int32)
            dev = self.device
            md = AttentionMetadata(
                slot_mapping=torch.from_numpy(slots).to(dev),
                query_start_loc=torch.arange(len(act) + 1, dtype=torch.int32).to(dev),
                seq_lens=torch.from_numpy(seq).to(dev),
                block_tables=torch.from_numpy(tables).to(dev),
                block_size=bs, max_query_len=1, max_seq_len=int(seq.max()),
                query_lens_cpu=[1] * len(act), seq_lens_cpu=seq.tolist(), num_decodes=len(act))
            ids = torch.tensor([last[i] for i in act], dtype=torch.int64, device=dev)
            hidden = self.model(ids, torch.from_numpy(pos).to(dev), self.kv_caches, md)
            logits = self.model.compute_logits(hidden).float()
            toks = logits.argmax(dim=-1)
            rand = [a for a, i in enumerate(act) if not greedy[i]]
            if rand:
                temp = torch.tensor([reqs[act[a]].params.temperature for a in rand], device=dev)
                probs = (logits[rand] / temp[:, None]).softmax(dim=-1)
                e = torch.empty_like(probs).exponential_(generator=self.generator)
                for r, a in enumerate(rand):
                    if gens[act[a]] is not None:
                        e[r].exponential_(generator=gens[act[a]])
                toks[rand] = (probs / e.clamp_(min=torch.finfo(e.dtype).tiny)).argmax(dim=-1)
                for r, a in enumerate(rand):
                    qs[act[a]].append(probs[r])
            for a, tok in enumerate(toks.tolist()):
                drafts[act[a]].append(tok)
                last[act[a]] = tok
        return drafts, [torch.stack(q) if q else None for q in qs]
