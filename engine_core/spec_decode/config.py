"""`--speculative-config` (vLLM's JSON): parsed and validated once, at startup."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16  # the verification pass grows with k; more never pays off


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram (prompt lookup): match the last n tokens, n from max down to min, against the request's
    # earlier tokens and propose what followed the most recent match.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # draft_model: a small model with the target's vocabulary (GGUF, HF dir or dummy:<config>).
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError("speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
                raise ValueError("speculative_config needs integers 1 <= prompt_lookup_min <= prompt_lookup_max, "
                                 f"got min={lo!r} max={hi!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.method 'draft_model' needs 'model' (the draft model)")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative_config.model is only for method 'draft_model'")

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots past the verified positions the proposer writes: a draft model feeds its own
        drafts back (k - 1 of them) after the bonus token; prompt lookup writes nothing."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """JSON string (the CLI flag), dict (LLM(speculative_config=...)) or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(value, dict):  # a user's value, reported like every config error
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")  # noqa: TRY004
        value = dict(value)
        if value.get("method") is None and value.get("model") in ("ngram", "[ngram]"):
            value["method"] = "ngram"  # vLLM's older spelling: {"model": "ngram", ...}
            value.pop("model")
        elif value.get("method") is None and value.get("model"):
            value["method"] = "draft_model"
        if value.get("method") == "draft" or value.get("method") == "draft-model":
            value["method"] = "draft_model"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {unknown}; known: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        return cls(**value)
