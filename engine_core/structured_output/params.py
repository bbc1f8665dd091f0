"""What a request's output must match: vLLM's `StructuredOutputsParams`, one kind per request."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# The kinds, in the order the gateway's extras name them (vLLM's guided_json / guided_regex / ...).
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the fields is set.

    json:           a JSON schema (dict, or its JSON text); the output is a JSON value valid against it
    json_object:    any JSON object (OpenAI's `response_format: {"type": "json_object"}`)
    regex:          the output matches this regular expression
    choice:         the output is exactly one of these strings
    grammar:        an EBNF (GBNF-style) grammar with a `root` rule
    structural_tag: an xgrammar structural tag (JSON text), for tool calls inside free text
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.choice is not None and not isinstance(self.choice, tuple):
            raise ValueError("structured_outputs.choice must be a list of strings")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            object.__setattr__(self, "json", parsed)
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(set_kinds) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        for name in ("regex", "grammar", "structural_tag"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as one canonical string (JSON texts with sorted keys)."""
        kind = self.kind
        if kind == "json":
            return json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if kind == "json_object":
            return ""
        if kind == "choice":
            return json.dumps(list(self.choice))
        return getattr(self, kind)

    @property
    def key(self) -> str:
        """Cache key: a hash of kind + canonical spec (what the grammar compiler caches by)."""
        return hashlib.sha256(f"{self.kind}\0{self.spec}".encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        kind = self.kind
        return {kind: list(self.choice) if kind == "choice" else getattr(self, kind)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredOutputsParams:
        unknown = set(d) - set(KINDS) - {"disable_any_whitespace"}
        if unknown:
            raise ValueError(f"structured_outputs: unknown field(s) {sorted(unknown)}; expected one of {KINDS}")
        return cls(**{k: v for k, v in d.items() if k in KINDS and v not in (None, False)})
