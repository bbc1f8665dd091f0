"""Per-request sampling parameters (OpenAI + vLLM semantics), validated at construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine_core.structured_output.params import StructuredOutputsParams

# Below this temperature sampling is greedy (argmax); matches vLLM's _SAMPLING_EPS.
GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # handled where text exists (detokenizer side)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token (0: only the sampled one)
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    # Token-level constraint on the output (JSON schema, regex, choice, grammar); None: free text.
    structured_outputs: StructuredOutputsParams | None = None
    # Generate best_of samples, return the n with the highest cumulative logprob (None: n).
    best_of: int | None = None
    # Beam search with n beams (vLLM's use_beam_search; HF's length_penalty / early_stopping).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            bad("best_of", f"must be an integer >= n ({self.n})")
        if self.use_beam_search and self.best_of is not None and self.best_of != self.n:
            bad("best_of", "must be unset (or equal n) with beam search")
        if not -1e6 <= self.length_penalty <= 1e6:
            bad("length_penalty", "must be a finite number")
        if self.temperature < 0.0:
            bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        if any(not s for s in self.stop):
            bad("stop", "must not contain empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams or a dict")
        for tok, bias in self.logit_bias.items():
            if tok < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias entries must map token ids >= 0 to values in [-100, 100], got {tok}: {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate_vocab(self, vocab_size: int) -> None:
        """Token ids in the params must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"{name} contains token id {t}, outside the vocabulary (size {vocab_size})")

    def beam_search_params(self):
        """The BeamSearchParams of a use_beam_search request (n is the beam width, as in vLLM)."""
        from engine_core.beam_search import BeamSearchParams

        if self.max_tokens is None:
            raise ValueError("max_tokens must be set for beam search")
        return BeamSearchParams(beam_width=self.n, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                                length_penalty=self.length_penalty, early_stopping=self.early_stopping)

    def for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n parallel samples: n=1, and a distinct seed when seeded,
        so the n outputs differ yet the whole request stays reproducible."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)
