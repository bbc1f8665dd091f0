"""Incremental detokenization and stop-string handling.

Independent of any engine state: the offline engine and the gRPC tokenizer service's
DetokenizeStream both drive one ``IncrementalDetokenizer`` per request/sequence.

Detokenization uses the decode-window scheme of vLLM / TGI: the text of a new token is
``decode(tokens[prefix_offset:]) - decode(tokens[prefix_offset:read_offset])``, where the window
always starts a few tokens back so that decoders which treat the first token specially
(sentencepiece's leading space) see the same context every time. A delta whose decoded tail ends
with U+FFFD (an incomplete multi-byte UTF-8 character split over byte-level tokens) is held back
until the next token completes it, so no delta ever carries half a character.

Stop strings: after every token the new text is searched for each stop string (only the region a
new match could occupy). The stop string that *completes first* wins -- the one with the smallest
end offset; on a tie, the one starting earliest (longest). This is what a char-by-char stream would
do and does not depend on how the text was split into tokens. The text is cut right before the stop
string (or right after it with ``include_stop_str_in_output``). Streaming deltas hold back the last
``max(len(stop)) - 1`` characters until the stream ends, so a stop string split over tokens is never
partially emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_core.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopChecker", "check_stop_strings", "find_stop_string"]

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used as decode context for the first output token (vLLM uses 5 too).
INITIAL_CONTEXT_TOKENS = 5
# A pending tail still ending in U+FFFD after this many tokens is garbage, not a split character
# (a UTF-8 character is at most 4 bytes): emit it rather than let the decode window grow forever.
MAX_PENDING_TOKENS = 16


def find_stop_string(text: str, stop: Sequence[str], start: int = 0) -> tuple[str, int] | None:
    """The stop string that completes first in ``text``, considering only occurrences that end
    after offset ``start`` (i.e. that involve text from ``start`` on). Returns ``(stop_str, index)``
    or None. Ties on the end offset go to the earliest-starting (longest) stop string."""
    best: tuple[int, int, str] | None = None  # (end, index, stop_str)
    for s in stop:
        if not s:
            continue
        idx = text.find(s, max(0, start - len(s) + 1))
        if idx < 0:
            continue
        key = (idx + len(s), idx, s)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        return None
    return best[2], best[1]


def check_stop_strings(
    text: str,
    new_char_count: int,
    stop: Sequence[str],
    include_stop_str_in_output: bool = False,
) -> tuple[str, str] | None:
    """Look for a stop string completed by the last ``new_char_count`` characters of ``text``.

    Returns ``(stop_str, trimmed_text)`` -- the text cut before the stop string, or after it with
    ``include_stop_str_in_output`` -- or None when no stop string occurs.
    """
    if not stop or new_char_count <= 0:
        return None
    found = find_stop_string(text, stop, len(text) - new_char_count)
    if found is None:
        return None
    s, idx = found
    return s, text[: idx + len(s)] if include_stop_str_in_output else text[:idx]


def stop_holdback(stop: Sequence[str], include_stop_str_in_output: bool = False) -> int:
    """Characters a stream must hold back so that no partial stop string is ever emitted."""
    if include_stop_str_in_output or not stop:
        return 0
    return max((len(s) for s in stop), default=1) - 1


class StopChecker:
    """Stop-string state for a text that grows by appending (no tokenizer involved).

    ``append(delta)`` returns the matched stop string (or None); ``text`` is trimmed at the stop;
    ``get_next_delta(finished)`` streams the text holding back ``stop_holdback`` characters."""

    def __init__(self, stop: Iterable[str] = (), include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop: list[str] = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.holdback = stop_holdback(self.stop, include_stop_str_in_output)
        self.text = ""
        self.stop_str: str | None = None
        self._emitted = 0

    @property
    def stopped(self) -> bool:
        return self.stop_str is not None

    def append(self, delta: str) -> str | None:
        if self.stop_str is not None or not delta:
            return None
        self.text += delta
        hit = check_stop_strings(self.text, len(delta), self.stop, self.include_stop_str_in_output)
        if hit is None:
            return None
        self.stop_str, self.text = hit
        return self.stop_str

    def get_next_delta(self, finished: bool = False) -> str:
        end = len(self.text)
        if not (finished or self.stop_str is not None):
            end = max(self._emitted, end - self.holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


class IncrementalDetokenizer:
    """Token ids in, text deltas out, for one generated sequence.

    ``update(ids)`` appends tokens and returns the stop string that matched (None otherwise); once a
    stop string matched, later tokens are ignored. ``output_text`` is the text so far (trimmed at the
    stop string; it lacks a held-back incomplete UTF-8 tail until ``finish()``).
    ``get_next_delta(finished)`` returns text not returned before, holding back the stop-string
    guard unless ``finished`` (or stopped); ``finished=True`` also flushes the held-back tail.
    ``output_token_ids`` lists the tokens consumed (up to the one completing a stop string).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stop = StopChecker(stop, include_stop_str_in_output)
        self.output_token_ids: list[int] = []

        # Decode window over context + output tokens.
        self._tokens: list[int] = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens)
        self._finished = False

    # -- public state -------------------------------------------------------------------------

    @property
    def stop(self) -> list[str]:
        return self._stop.stop

    @property
    def include_stop_str_in_output(self) -> bool:
        return self._stop.include_stop_str_in_output

    @property
    def output_text(self) -> str:
        return self._stop.text

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._stop.stop_str

    @property
    def stopped(self) -> bool:
        return self._stop.stop_str is not None

    # -- core ---------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode_raw(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, token_id: int) -> str:
        """Append one token; return the newly complete text (maybe "")."""
        self._tokens.append(token_id)
        new_text = self._decode(self._tokens[self._prefix_offset :])
        pending = len(self._tokens) - self._read_offset
        if len(new_text) <= len(self._prefix_text) or (
            new_text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_TOKENS
        ):
            # Nothing visible yet (e.g. a skipped special token) or an incomplete UTF-8 char:
            # keep the window (its first token keeps providing context) and wait.
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        # Keep the context list from growing without bound.
        if self._prefix_offset > 1024:
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Append generated tokens; return the stop string matched by them, else None."""
        if self._finished or self.stopped:
            return None
        for tok in new_token_ids:
            self.output_token_ids.append(int(tok))
            delta = self._step(int(tok))
            if delta and self._stop.append(delta) is not None:
                return self._stop.stop_str
        return None

    def finish(self) -> str | None:
        """End of sequence: flush a held-back tail (an incomplete character decodes to U+FFFD, like
        ``tokenizer.decode`` would). Returns the stop string if the flushed text completed one."""
        if self._finished:
            return None
        self._finished = True
        if self.stopped or len(self._tokens) == self._read_offset:
            return None
        new_text = self._decode(self._tokens[self._prefix_offset :])
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._tokens)
        self._prefix_text = ""
        return self._stop.append(delta) if delta else None

    def get_next_delta(self, finished: bool = False) -> str:
        """Text produced since the last call. Unless ``finished`` (or a stop string matched), the
        last ``max(len(stop)) - 1`` characters are held back."""
        if finished:
            self.finish()
        return self._stop.get_next_delta(finished)
