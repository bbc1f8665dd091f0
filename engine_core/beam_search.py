"""Beam search: parameters and the per-step beam selection, with Hugging Face transformers'
rules (`GenerationMixin._beam_search`, transformers 5.x) reproduced exactly:

- each step keeps the top `beams_to_keep = max(2, 1 + #eos) * beam_width` continuations over all
  running beams (score = running cumulative logprob + the token's raw logprob);
- a continuation that hits a stop (EOS, max_tokens, max_model_len) becomes a finished hypothesis
  only if it ranks among the first `beam_width` of them; its score is
  `cumulative logprob / generated_len ** length_penalty` (generated_len counts the EOS);
- the next running beams are the best `beam_width` continuations that did not stop;
- the finished set keeps the best `beam_width` hypotheses; with early_stopping=False (HF's default)
  the search ends once all beam_width slots are filled and the best running beam's
  `score / generated_len ** length_penalty` cannot beat the worst finished one; with
  early_stopping=True once the slots are filled; always once every continuation stops.

The selection is pure (token ids and logprobs in, decisions out); the scheduler applies the
decisions by forking block tables (engine_core/sequence_group.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine_core.sampling_params import SamplingParams

HF_NEG = -1.0e9  # HF's "impossible" score


@dataclass
class BeamSearchParams:
    """vLLM's offline BeamSearchParams (plus HF's early_stopping)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # accepted for vLLM compatibility; only 0 (deterministic) is supported
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature != 0.0:
            raise ValueError(f"beam search is deterministic: temperature must be 0, got {self.temperature!r}")
        if not isinstance(self.early_stopping, bool):
            raise ValueError(f"early_stopping must be a boolean, got {self.early_stopping!r}")  # noqa: TRY004 (400, not 500)

    def beams_to_keep(self, num_eos: int) -> int:
        """Continuations kept per step (and top logprobs each beam needs): HF's rule."""
        return max(2, 1 + (0 if self.ignore_eos else num_eos)) * self.beam_width

    def beam_sampling_params(self, num_eos: int) -> SamplingParams:
        """What each beam asks the executor for: the argmax and the top beams_to_keep logprobs."""
        return SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True,
                              logprobs=self.beams_to_keep(num_eos))


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens, their logprobs and the length-penalised score."""

    token_ids: list[int]
    logprobs: list[float]
    score: float
    finish_reason: str  # "stop" (EOS) or "length"

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.logprobs)


@dataclass
class Continuation:
    """One chosen next beam: parent beam (index into the step's beams), token, new cumulative score."""

    parent: int
    token_id: int
    logprob: float
    score: float


@dataclass
class BeamStepDecision:
    running: list[Continuation]
    done: bool


@dataclass
class BeamSearchState:
    params: BeamSearchParams
    eos_token_ids: tuple[int, ...]
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most beam_width
    heuristic_unsatisfied: bool = True  # HF: is_early_stop_heuristic_unsatisfied

    def step(self, beams: list[tuple[float, list[int], list[float]]], top: list[tuple[list[int], list[float]]],
             gen_len: int, length_exhausted: bool) -> BeamStepDecision:
        """beams[i] = (running score, generated tokens, their logprobs) in running order (best
        first); top[i] = (top token ids, their raw logprobs) of beam i's next position. gen_len:
        generated tokens after this step; length_exhausted: max_tokens / max_model_len reached."""
        p = self.params
        k = p.beam_width
        keep = p.beams_to_keep(len(self.eos_token_ids))
        cands: list[tuple[float, int, int, float]] = []
        for i, (score, _, _) in enumerate(beams):
            ids, lps = top[i]
            cands.extend((score + lp, i, t, lp) for t, lp in zip(ids[:keep], lps[:keep]))
        # torch.topk over [beam, vocab] flattened; ties go to the lower flat index (beam, then token).
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[:keep]
        hits = [length_exhausted or (not p.ignore_eos and c[2] in self.eos_token_ids) for c in cands]
        running = [Continuation(i, t, lp, s) for (s, i, t, lp), h in zip(cands, hits) if not h][:k]
        # Finished hypotheses: only the first k continuations may finish (HF's top_num_beam_mask).
        can_add = self.heuristic_unsatisfied and not (p.early_stopping and len(self.finished) == k)
        if can_add:
            for pos, ((s, i, t, lp), h) in enumerate(zip(cands, hits)):
                if pos < k and h:
                    _, toks, lps = beams[i]
                    reason = "length" if t not in self.eos_token_ids or p.ignore_eos else "stop"
                    self.finished.append(Hypothesis(toks + [t], lps + [lp], s / gen_len ** p.length_penalty, reason))
            self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties (HF merge order)
            del self.finished[k:]
        if running and len(self.finished) == k:
            best = running[0].score / gen_len ** p.length_penalty
            self.heuristic_unsatisfied = best > self.finished[-1].score
        done = (not self.heuristic_unsatisfied or (p.early_stopping and len(self.finished) == k)
                or all(hits) or not running)
        return BeamStepDecision(running, done)
