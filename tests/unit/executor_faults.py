"""Executor wrappers that fail on purpose, for tests of the engine's recovery (reset + replay)."""
from __future__ import annotations

from engine_core.executor.base import ExecutorError


class FailOnce:
    """An executor whose n-th submit fails once (the engine resets it and replays every request)."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.calls, self.at = inner, 0, at

    def submit(self, so) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise ExecutorError("injected failure")
        self.inner.submit(so)

    def __getattr__(self, name):
        return getattr(self.inner, name)
