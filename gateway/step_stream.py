"""The gateway worker's one multiplexed Scheduler.GenerateStream (DESIGN.md §1: messages scale with
engine steps, not with requests x tokens).

Every generation of this worker (gateway/generation.py `PromptGeneration`, one per prompt) is a
`StreamClient` under a stream-local key. The scheduler sends one message per engine step with the
new tokens of all of them; the reader turns it into ONE DetokenizeBatch round trip to the tokenizer
service (gateway/detokenize_batch.py) and then hands each client its outputs (synchronously: a
client only queues SSE events for its HTTP response). Adds and aborts are written by one writer
task, coalesced into one message per wake-up.

A broken stream (scheduler gone or restarted) fails every client on it (their HTTP answers get a
503, in-band when streaming); the next request opens a new stream.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

import grpc

from gateway.detokenize_batch import DetokenizeBatchClient
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from services.gen.pagedserve.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

logger = logging.getLogger(__name__)

_KEYS = 2**32  # StreamAdd.key is a uint32


class StreamClient(Protocol):
    """One request on the stream (gateway/generation.py implements it)."""

    def on_admitted(self) -> None: ...

    def on_failed(self, error: APIError) -> None: ...

    def detok_entry(self, entries, index: int, token_ids: list[int],
                    final: scheduler_pb2.GenerateResponse | None) -> bool: ...

    def on_output(self, index: int, token_ids: list[int], logprobs: list[common_pb2.TokenLogprobs] | None,
                  final: scheduler_pb2.GenerateResponse | None, text: tokenizer_pb2.DetokenizeResult | None) -> None: ...


class StepStream:
    def __init__(self, scheduler: scheduler_pb2_grpc.SchedulerStub, tokenizer: tokenizer_pb2_grpc.TokenizerStub,
                 retry_after_s: int = 1, on_broken: Callable[[APIError], None] | None = None) -> None:
        self._stub = scheduler
        self._on_broken = on_broken  # told before the clients, so that they can fail over elsewhere
        self.detok = DetokenizeBatchClient(tokenizer)
        self._retry_after_s = retry_after_s
        self._keys = itertools.count(1)
        self._clients: dict[int, StreamClient] = {}
        self._call: grpc.aio.StreamStreamCall | None = None
        self._tasks: list[asyncio.Task] = []
        self._out = scheduler_pb2.GenerateStreamRequest()
        self._wake = asyncio.Event()
        self.messages_received = 0
        metrics = GatewayMetrics.get().stream_messages
        self._m_sched, self._m_detok = metrics.labels("scheduler"), metrics.labels("detokenize")

    # ------------------------------------------------------------------ client side
    def add(self, client: StreamClient, request: scheduler_pb2.GenerateRequest,
            trace_context: list[tuple[str, str]] | None) -> int:
        """Register `client` and send its request; returns its key."""
        self._ensure_open()
        key = next(self._keys) % _KEYS
        while key == 0 or key in self._clients:
            key = next(self._keys) % _KEYS
        self._clients[key] = client
        add = self._out.add.add(key=key)
        add.request.CopyFrom(request)
        if trace_context:
            add.trace_context.update(dict(trace_context))
        self._wake.set()
        return key

    def abort(self, key: int, stop_str: str | None = None, indices: tuple[int, ...] = ()) -> None:
        ab = self._out.abort.add(key=key, indices=indices)
        if stop_str is not None:
            ab.stop_str = stop_str
        self._wake.set()

    def forget(self, key: int) -> None:
        """The client needs no more outputs (finished, or closed after an abort)."""
        self._clients.pop(key, None)

    def fail_all(self, error: APIError) -> int:
        """End every request on the stream with `error` (the end of a drain); their close() aborts them
        in the scheduler. Returns how many there were."""
        clients = list(self._clients.values())
        for c in clients:
            c.on_failed(error)
        return len(clients)

    # ------------------------------------------------------------------ the stream
    def _ensure_open(self) -> None:
        if self._call is not None:
            return
        call = self._call = self._stub.GenerateStream()
        self._tasks = [asyncio.ensure_future(self._write_loop(call)), asyncio.ensure_future(self._read_loop(call))]

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._call is not call:
                    return
                msg, self._out = self._out, scheduler_pb2.GenerateStreamRequest()
                await call.write(msg)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:  # the reader sees the failure too
            logger.debug("GenerateStream write failed: %r", e)

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        from gateway.backend import rpc_error_to_api

        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    raise APIError(503, "The scheduler ended the request stream (is it shutting down?).",
                                   code="service_unavailable")
                self.messages_received += 1
                self._m_sched.inc()
                await self._dispatch(msg)
        except grpc.RpcError as e:
            self._broken(call, rpc_error_to_api(e, "scheduler", self._retry_after_s))
        except APIError as e:
            self._broken(call, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("GenerateStream reader failed")
            self._broken(call, APIError(500, f"Internal server error ({type(e).__name__}).", code="internal_error"))

    def _broken(self, call: grpc.aio.StreamStreamCall, error: APIError) -> None:
        if self._call is not call:
            return
        logger.warning("scheduler stream failed (%d requests on it): %s", len(self._clients), error.message)
        self._call = None
        call.cancel()
        if self._on_broken is not None:
            self._on_broken(error)
        clients, self._clients = self._clients, {}
        self._out = scheduler_pb2.GenerateStreamRequest()
        self._wake.set()  # the old writer returns
        for c in clients.values():
            c.on_failed(error)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()  # the scheduler aborts every request still on it
        for t in self._tasks:
            t.cancel()
        self._wake.set()
        self.detok.close()

    # ------------------------------------------------------------------ one step
    async def _dispatch(self, msg: scheduler_pb2.GenerateStreamResponse) -> None:
        from gateway.backend import status_to_api

        clients = self._clients
        for key in msg.accepted:
            c = clients.get(key)
            if c is not None:
                c.on_admitted()
        for st in msg.errors:
            c = clients.pop(st.key, None)
            if c is not None:
                c.on_failed(status_to_api(st.code, st.message, "scheduler", self._retry_after_s))
        outs: list[tuple] = []
        if msg.keys:
            toks = list(msg.token_ids)
            pos = 0
            for key, idx, n in zip(msg.keys, msg.indices, msg.num_tokens):
                c = clients.get(key)
                if c is not None:
                    outs.append((c, idx, toks[pos:pos + n], None, None))
                pos += n
        for o in msg.outputs:
            c = clients.get(o.key)
            if c is not None:
                r = o.response
                final = r if r.finish_reason != scheduler_pb2.FINISH_REASON_UNSPECIFIED else None
                outs.append((c, r.index, list(r.token_ids), list(r.logprobs) or None, final))
        if not outs:
            return
        batch = tokenizer_pb2.DetokenizeBatchRequest()
        entries, where = batch.entries, []
        for i, (c, idx, ids, _, final) in enumerate(outs):
            if c.detok_entry(entries, idx, ids, final):  # built in place: no per-entry copy
                where.append(i)
        texts: list[tokenizer_pb2.DetokenizeResult | None] = [None] * len(outs)
        if where:
            try:
                results = await self.detok.run(batch)
            except APIError as e:
                for c in {id(o[0]): o[0] for o in outs}.values():
                    c.on_failed(e)
                return
            self._m_detok.inc()
            for i, r in zip(where, results):
                texts[i] = r
        for (c, idx, ids, lps, final), text in zip(outs, texts):
            c.on_output(idx, ids, lps, final, text)
