"""Streaming tool calls: one choice's text deltas -> chat deltas (`content` and/or `tool_calls`).

named     the text is the arguments: a first delta names the call, then arguments stream as they come
required  the text is a JSON array of calls: parsed and sent whole when the choice finishes
auto      content streams, holding back any tail that could start a `<tool_call>` tag; from the tag
          on, text is buffered and parsed into calls at the end
none      plain content
"""
from __future__ import annotations

from typing import Any

from engine_core.tool_calls import (
    TOOL_CALL_START,
    ToolChoice,
    held_back_prefix,
    new_tool_call_id,
    parse_tool_calls,
)


class ToolCallStream:
    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self._held = ""  # auto: content not sent yet (a possible tag prefix, or everything after a tag)
        self._in_call = False
        self._buffer: list[str] = []  # required: the whole text
        self._named_id: str | None = None
        self.has_calls = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        mode = self.choice.mode
        if not text:
            return []
        if mode == "named":
            out = []
            if self._named_id is None:
                self._named_id = new_tool_call_id()
                self.has_calls = True
                out.append({"tool_calls": [{"index": 0, "id": self._named_id, "type": "function",
                                            "function": {"name": self.choice.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        if mode == "required":
            self._buffer.append(text)
            return []
        if mode == "auto":
            self._held += text
            if self._in_call:
                return []
            start = self._held.find(TOOL_CALL_START)
            if start >= 0:
                self._in_call = True
                before, self._held = self._held[:start], self._held[start:]
                return [{"content": before}] if before else []
            keep = held_back_prefix(self._held)
            send, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
            return [{"content": send}] if send else []
        return [{"content": text}]

    def finish(self) -> list[dict[str, Any]]:
        """The remaining deltas once the choice has finished (has_calls tells the finish reason)."""
        mode = self.choice.mode
        if mode == "required":
            content, calls = parse_tool_calls("".join(self._buffer), self.choice)
            if calls:
                self.has_calls = True
                return [{"tool_calls": [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]}]
            return [{"content": content}] if content else []
        if mode == "auto" and self._held:
            held, self._held = self._held, ""
            content, calls = parse_tool_calls(held, self.choice)
            out = [{"content": content}] if content else []
            if calls:
                self.has_calls = True
                out.append({"tool_calls": [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]})
            return out
        return []
