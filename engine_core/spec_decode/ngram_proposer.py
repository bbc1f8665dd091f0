"""Prompt lookup (n-gram) proposer: drafts are the tokens that followed the most recent earlier
occurrence of the request's last n tokens. Runs on the host over the executor's token rows (the
executor knows every request's tokens, so no extra state and nothing crosses the wire)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass
class NgramProposer:
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4

    def propose(self, tokens: np.ndarray, max_tokens: int | None = None) -> list[int]:
        """Up to min(k, max_tokens) draft tokens for a request whose tokens so far are `tokens`.

        The longest n in [min, max] whose suffix n-gram occurred before wins; among its earlier
        occurrences the most recent one with k tokens after it is used (local context predicts best). Empty: no match."""
        k = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        L = tokens.shape[0]
        if k <= 0:
            return []
        best: list[int] = []
        for n in range(min(self.prompt_lookup_max, L - 1), self.prompt_lookup_min - 1, -1):
            # windows[i] = tokens[i:i+n] for i in [0, L-n-1]: occurrences that have a continuation.
            windows = sliding_window_view(tokens[: L - 1], n)
            hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
            if hits.size:
                # The most recent occurrence with k tokens after it; a match right behind the
                # suffix (a repeated run) would cut the draft short, so a shorter n may do better.
                full = hits[hits + n + k <= L]
                start = int(full[-1] if full.size else hits[-1]) + n
                draft = tokens[start: start + k].tolist()
                if len(draft) == k:
                    return draft
                if len(draft) > len(best):
                    best = draft
        return best
