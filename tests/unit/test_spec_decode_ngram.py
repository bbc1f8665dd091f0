"""Prompt-lookup proposer: longest n-gram first, most recent occurrence with a full continuation."""
from __future__ import annotations

import numpy as np

from engine_core.spec_decode.ngram_proposer import NgramProposer


def test_longest_suffix_match_and_continuation():
    p = NgramProposer(3, prompt_lookup_min=1, prompt_lookup_max=4)
    assert p.propose(np.array([1, 2, 3, 4, 5, 1, 2])) == [3, 4, 5]
    # "9 1 2" occurs later than "1 2" alone would suggest: the longer match wins.
    assert p.propose(np.array([1, 2, 7, 7, 9, 1, 2, 8, 8, 9, 1, 2])) == [8, 8, 9]
    assert p.propose(np.array([1, 2, 3, 4, 5, 1, 2]), max_tokens=2) == [3, 4]


def test_repeated_run_and_no_match():
    p = NgramProposer(3, prompt_lookup_min=1, prompt_lookup_max=4)
    assert p.propose(np.array([7, 7, 7, 7, 7])) == [7, 7, 7]  # a shorter n gives a full draft
    assert p.propose(np.array([1, 2, 3])) == []
    assert p.propose(np.array([5])) == []
    assert NgramProposer(3, prompt_lookup_min=2, prompt_lookup_max=3).propose(np.array([4, 1, 2, 4])) == []
