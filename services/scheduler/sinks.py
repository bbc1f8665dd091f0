"""Where a request's outputs go: the engine thread groups each step's deltas by sink and posts ONE
callback per step to the event loop (services/scheduler/output_routing.py `_route`); the sink turns
them into gRPC messages there.

- `CallSink`: one `Generate` call (the documented per-request RPC): fans the step batch out into
  the call's asyncio.Queue as GenerateResponse messages.
- `StreamSink`: one `GenerateStream` (a gateway worker's multiplexed stream): the step's outputs of
  all its requests become one GenerateStreamResponse. Everything delivered before the writer runs
  again is coalesced into the same message, so a busy stream never falls behind by more than one.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from services import convert
from services.gen.pagedserve.v1 import scheduler_pb2


@dataclass
class CallFailed:
    """A request's end with a gRPC status instead of a final message."""

    code: grpc.StatusCode
    message: str


@dataclass(slots=True)
class SampleDelta:
    """One sample's output of one step: new tokens (and logprobs); `final` is the sample's final
    message (finish reason, usage, metrics) when it finished in this step."""

    call: object  # engine_loop.GenerateCall
    index: int
    token_ids: list[int]
    logprobs: list | None
    final: scheduler_pb2.GenerateResponse | None = None

    def to_response(self) -> scheduler_pb2.GenerateResponse:
        msg = self.final if self.final is not None else scheduler_pb2.GenerateResponse(index=self.index)
        if self.token_ids:
            msg.token_ids.extend(self.token_ids)
        if self.logprobs:
            msg.logprobs.extend([convert.token_logprobs_to_proto(x) for x in self.logprobs])
        return msg


class CallSink:
    """Outputs of one Generate call: `accepted` resolves with None (queued) or a CallFailed; then
    `next()` gives GenerateResponse messages and possibly a CallFailed. A sample's output that finds
    its previous message still waiting to be written (the client reads slower than the engine
    steps) is merged into it, so a slow call costs one write per wake-up, not one per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.accepted: asyncio.Future = loop.create_future()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._unsent: dict[int, scheduler_pb2.GenerateResponse] = {}  # sample index -> queued, not final

    def admitted(self, call, verdict: CallFailed | None) -> None:
        if not self.accepted.done():
            self.accepted.set_result(verdict)

    def deliver(self, items: list[SampleDelta]) -> None:
        for it in items:
            msg = it.to_response()
            last = self._unsent.get(it.index)
            if last is not None:
                last.MergeFrom(msg)  # repeated fields (tokens, logprobs) append; a final's fields set
                if it.final is not None:
                    del self._unsent[it.index]
                continue
            self.queue.put_nowait(msg)
            if it.final is None:
                self._unsent[it.index] = msg

    async def next(self) -> scheduler_pb2.GenerateResponse | CallFailed:
        item = await self.queue.get()
        if isinstance(item, scheduler_pb2.GenerateResponse) and self._unsent.get(item.index) is item:
            del self._unsent[item.index]
        return item

    def fail(self, call, failure: CallFailed) -> None:
        self.queue.put_nowait(failure)


@dataclass(eq=False)
class StreamSink:
    """Outputs of every request on one GenerateStream. `on_final(call, msg)` runs for each sample's
    final message, `on_done(call)` once per request that is over (all samples final, rejected or
    failed)."""

    on_done: Callable[[object], None]
    on_final: Callable[[object, scheduler_pb2.GenerateResponse], None] = lambda call, msg: None
    _pending: scheduler_pb2.GenerateStreamResponse = field(default_factory=scheduler_pb2.GenerateStreamResponse)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    messages_sent: int = 0

    def admitted(self, call, verdict: CallFailed | None) -> None:
        if verdict is None:
            self._pending.accepted.append(call.key)
        else:
            self._fail(call, verdict)
        self._wake.set()

    def fail(self, call, failure: CallFailed) -> None:
        self._fail(call, failure)
        self._wake.set()

    def _fail(self, call, failure: CallFailed) -> None:
        self._pending.errors.add(key=call.key, code=failure.code.value[0], message=failure.message)
        self.on_done(call)

    def deliver(self, items: list[SampleDelta]) -> None:
        keys, indices, nums, toks = [], [], [], []
        pending = self._pending
        for it in items:
            call = it.call
            if it.final is None and not it.logprobs:
                keys.append(call.key)
                indices.append(it.index)
                nums.append(len(it.token_ids))
                toks.extend(it.token_ids)
                continue
            msg = pending.outputs.add(key=call.key, response=it.to_response()).response
            if it.final is not None:
                self.on_final(call, msg)
                call.remaining -= 1
                if call.remaining == 0:
                    self.on_done(call)
        if keys:
            pending.keys.extend(keys)
            pending.indices.extend(indices)
            pending.num_tokens.extend(nums)
            pending.token_ids.extend(toks)
        self._wake.set()

    async def next_message(self) -> scheduler_pb2.GenerateStreamResponse:
        """The outputs gathered since the last call (waits until there are some)."""
        await self._wake.wait()
        self._wake.clear()
        msg, self._pending = self._pending, scheduler_pb2.GenerateStreamResponse()
        self.messages_sent += 1
        return msg

    def wake(self) -> None:
        """Let next_message return (possibly empty): the stream is ending."""
        self._wake.set()
