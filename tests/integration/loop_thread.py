"""An asyncio loop on a background thread, so sync tests can drive grpc.aio servers and clients."""
from __future__ import annotations

import asyncio
import threading


class LoopThread:
    def __init__(self, name: str = "test-loop", default_timeout: float = 30) -> None:
        self.default_timeout = default_timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.default_timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
