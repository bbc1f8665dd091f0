"""Incremental detokenization and stop-string handling.

Independent of any engine state: the offline engine and the gRPC tokenizer service's
DetokenizeStream both drive one ``IncrementalDetokenizer`` per request/sequence.

Detokenization is tokenizers' ``DecodeStream`` (the decode-window scheme of vLLM / TGI, in Rust),
stepped one token at a time and started on the last few prompt tokens, so that decoders which treat
the first token specially (sentencepiece's leading space) see the same context as a full decode.
The stream returns nothing while the text ends with U+FFFD (an incomplete multi-byte UTF-8 character
split over byte-level tokens), so no delta ever carries half a character; ``finish()`` flushes such
a held-back tail the way ``decode`` would (as U+FFFD).

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

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from engine_core.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopChecker", "check_stop_strings", "find_stop_string"]

# Prompt tokens used as decode context for the first output token (vLLM uses 5 too).
INITIAL_CONTEXT_TOKENS = 5
# A held-back tail still incomplete after this many tokens is garbage, not a split character
# (a UTF-8 character is at most 4 bytes): emit it rather than let the decode window grow forever.
MAX_PENDING_TOKENS = 16
# DecodeStream's error when a decoder's output is not monotonic (vLLM #17448): restart the stream.
_INVALID_PREFIX = "Invalid prefix encountered"


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
        self._backend = tokenizer.backend
        context = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        # DecodeStream would emit a context that ends inside a character (a prompt given as ids, cut
        # mid-character) as output: leave such a tail out of the context.
        while context and tokenizer.decode_raw(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            context.pop()
        self._stream = DecodeStream(context, skip_special_tokens)
        # For finish(): the ids the stream holds back (no text yet) and up to INITIAL_CONTEXT_TOKENS
        # ids before them, which decode them the way the stream would.
        self._context = context
        self._pending: list[int] = []
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

    def _restart_stream(self) -> None:
        """A fresh stream without context (its old state is unusable or only holds garbage)."""
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        self._context = []

    def _pending_text(self) -> str:
        """The held-back ids' text, decoded after their context (U+FFFD for an incomplete char)."""
        decode, skip = self.tokenizer.decode_raw, self.skip_special_tokens
        before = decode(self._context, skip_special_tokens=skip) if self._context else ""
        return decode(self._context + self._pending, skip_special_tokens=skip)[len(before) :]

    def _step(self, token_id: int) -> str:
        """Append one token; return the newly complete text (maybe "")."""
        self._pending.append(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            self._restart_stream()  # the ids held back so far are dropped, as vLLM does
            self._pending = [token_id]
            text = self._stream.step(self._backend, token_id)
        if text is None:  # nothing visible yet: a skipped special token or an incomplete character
            if len(self._pending) < MAX_PENDING_TOKENS:
                return ""
            text = self._pending_text()
            if text:  # garbage bytes (not just skipped special tokens): emit them and move past
                self._restart_stream()
                self._pending.clear()
                return text
        self._context += self._pending
        del self._context[:-INITIAL_CONTEXT_TOKENS]
        self._pending.clear()
        return text

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Append generated tokens; return the stop string matched by them, else None."""
        if self._finished or self.stopped:
            return None
        for tok in map(int, new_token_ids):
            self.output_token_ids.append(tok)
            delta = self._step(tok)
            if delta and self._stop.append(delta) is not None:
                return self._stop.stop_str
        return None

    def finish(self) -> str | None:
        """End of sequence: flush a held-back tail (an incomplete character decodes to U+FFFD, like
        ``tokenizer.decode`` would). Returns the stop string if the flushed text completed one."""
        if self._finished:
            return None
        self._finished = True
        if self.stopped or not self._pending:
            return None
        delta = self._pending_text()
        self._pending.clear()
        return self._stop.append(delta) if delta else None

    def get_next_delta(self, finished: bool = False) -> str:
        """Text produced since the last call. Unless ``finished`` (or a stop string matched), the
        last ``max(len(stop)) - 1`` characters are held back."""
        if finished:
            self.finish()
        return self._stop.get_next_delta(finished)
