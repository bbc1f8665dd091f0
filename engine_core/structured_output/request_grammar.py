"""One request's grammar state on the scheduler side: an xgrammar matcher advanced with every
token the request keeps.

The scheduler owns it (not the executor), so an executor restart or a preemption loses nothing:
the matcher already reflects exactly the request's output tokens, which is what the replayed
request resumes from. The bitmask for the next sampled position is filled when the step that
samples it is scheduled and travels with the step (StepBatch's grammar_bitmask).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestGrammar:
    matcher: Any  # xgrammar.GrammarMatcher
    vocab_size: int
    num_accepted: int = 0  # output tokens the matcher has consumed
    _scratch: Any = field(default=None, repr=False)

    @property
    def words(self) -> int:
        return (self.vocab_size + 31) // 32

    def accept(self, token_id: int) -> bool:
        """Advance with a sampled token; False if the grammar forbids it (never for a masked sample)."""
        if self.matcher.is_terminated():
            return False
        ok = bool(self.matcher.accept_token(int(token_id)))
        if ok:
            self.num_accepted += 1
        return ok

    def rollback_to(self, num_output_tokens: int) -> None:
        """Forget tokens the request no longer holds (a discarded speculative or surplus token)."""
        extra = self.num_accepted - num_output_tokens
        if extra > 0:
            self.matcher.rollback(extra)
            self.num_accepted -= extra

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def next_bitmask(self) -> np.ndarray:
        """Allowed tokens for the next position: [words] int32, bit i of word i//32 = token i."""
        import torch

        if self._scratch is None:
            self._scratch = torch.zeros((1, self.words), dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(self._scratch, 0)
        return self._scratch[0].numpy().copy()
