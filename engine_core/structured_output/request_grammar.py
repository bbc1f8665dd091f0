"""One request's grammar state on the scheduler side: an xgrammar matcher advanced with every
token the request keeps.

The scheduler owns it (not the executor), so an executor restart or a preemption loses nothing:
the matcher already reflects exactly the request's output tokens, which is what the replayed
request resumes from. The bitmask for the next sampled position is filled when the step that
samples it is scheduled and travels with the step (StepBatch's grammar_bitmask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class RequestGrammar:
    matcher: Any  # xgrammar.GrammarMatcher
    vocab_size: int
    num_accepted: int = 0  # output tokens the matcher has consumed

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
        return BitmaskFiller(max_threads=1).fill([self])[0]


class BitmaskFiller:
    """Fills the bitmasks of many requests at once with xgrammar's batch matcher (C++, outside the
    GIL) into a fresh [n, words] int32 array. One thread by default: measured on an H200 host
    (benchmarks/structured_output.py --fill-threads), 32 JSON-schema masks take 0.46 ms on one
    thread and 3.3 ms with xgrammar's "auto" (16) threads, whose dispatch costs more than the fill."""

    def __init__(self, max_threads: int | str = 1) -> None:
        import xgrammar as xgr

        self._batch = xgr.BatchGrammarMatcher(max_threads=max_threads)

    def fill(self, grammars: list[RequestGrammar]) -> np.ndarray:
        words = grammars[0].words
        out = np.empty((len(grammars), words), dtype=np.int32)
        if len(grammars) == 1:
            grammars[0].matcher.fill_next_token_bitmask(out, 0)
        else:
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], out)
        return out


def accept_first_tokens(pairs: list[tuple[RequestGrammar, int]]) -> list[bool]:
    """Advance many matchers by one token each in one call (xgrammar's batch accept)."""
    if not pairs:
        return []
    if len(pairs) == 1:
        return [pairs[0][0].accept(pairs[0][1])]
    import xgrammar as xgr

    grammars = [g for g, _ in pairs]
    oks = xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in grammars], [int(t) for _, t in pairs])
    for g, ok in zip(grammars, oks):
        g.num_accepted += bool(ok)
    return [bool(ok) for ok in oks]
