"""Grammar compilation with xgrammar, cached by the constraint's hash.

Compiling is the only expensive part of structured output (milliseconds for a typical schema, more
for large ones), so it never runs on the engine's step thread: the scheduler service compiles in a
worker thread while the request waits for admission, and the offline engine compiles in
`add_request`. A spec seen before costs a dict lookup. Compile errors become ValueErrors that name
what is wrong (HTTP 400 / gRPC INVALID_ARGUMENT), before any model compute.

Why xgrammar: CPU wheels, a C++ compiler for JSON schema / regex / EBNF / structural tags with an
adaptive token-mask cache, and a matcher whose per-token mask fill costs microseconds.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from engine_core.structured_output.params import StructuredOutputsParams


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - declared in pyproject
        raise ValueError("structured output needs the `xgrammar` package (pip install xgrammar)") from e
    return xgrammar


@dataclass
class CompileStats:
    compiles: int = 0
    cache_hits: int = 0
    compile_time_s: float = 0.0
    errors: int = 0


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF that matches exactly one of the strings (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer + model vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], *,
                 max_cached: int = 512, max_threads: int = 2) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        hf = getattr(tokenizer, "hf", tokenizer)  # engine_core.tokenizer.Tokenizer or an HF tokenizer
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)
        self.stop_token_ids = list(stop_token_ids)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None)
        # xgrammar keeps its own cache too; ours is keyed by our hash and bounded by count.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=True)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self.stats = CompileStats()

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The xgrammar CompiledGrammar for params (cached); ValueError if the spec is invalid."""
        key = params.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return hit
        t0 = time.perf_counter()
        try:
            compiled = self._compile(params)
        except ValueError:
            self.stats.errors += 1
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/InvalidJSONError with the C++ reason
            self.stats.errors += 1
            raise ValueError(f"invalid {params.kind} constraint: {_reason(e)}") from None
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_time_s += time.perf_counter() - t0
            self._cache[key] = compiled
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, p: StructuredOutputsParams) -> Any:
        c = self._compiler
        kind = p.kind
        if kind == "json":
            schema = p.json
            if schema is True or schema == {}:
                return c.compile_builtin_json_grammar()
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            # Compact JSON: with free whitespace a small model can emit blanks forever.
            return c.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return c.compile_regex(p.regex)
        if kind == "choice":
            return c.compile_grammar(choice_grammar(p.choice))
        if kind == "grammar":
            return c.compile_grammar(p.grammar)
        if kind == "structural_tag":
            return c.compile_structural_tag(p.structural_tag)
        raise ValueError(f"unsupported structured output kind {kind!r}")  # pragma: no cover

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None)


def _reason(e: Exception) -> str:
    """xgrammar's messages start with a '[time] file.cc:line: ' prefix; keep the reason."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "] " in msg and ".cc:" in msg:
        msg = msg.split(": ", 1)[-1]
    return msg[:500]
