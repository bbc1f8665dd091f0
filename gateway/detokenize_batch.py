"""The gateway worker's one DetokenizeBatch stream to the tokenizer service: one request message
(and one answer) per engine step for all of the worker's samples, instead of a DetokenizeStream
round trip per sample per step (DESIGN.md §1; docs/architecture.md says why detokenization stays in
the tokenizer service).

Used by one caller at a time (the step stream's reader, gateway/step_stream.py), so a request and
its answer never interleave with another's. Keys of samples that went away are closed with the
next message (their state in the tokenizer is dropped).
"""
from __future__ import annotations

import logging

import grpc

from gateway.errors import APIError
from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

logger = logging.getLogger(__name__)


class DetokenizeBatchClient:
    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
        self._stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None
        self._closing: list[int] = []
        self.messages_sent = 0  # observability / the batching acceptance test

    def close_key(self, key: int) -> None:
        """Drop a sample's detokenizer state (its request is gone) with the next message."""
        self._closing.append(key)

    async def run(self, batch: tokenizer_pb2.DetokenizeBatchRequest) -> list[tokenizer_pb2.DetokenizeResult]:
        """Results parallel to `batch.entries` (close entries for gone keys are appended after them);
        APIError 503 when the tokenizer service fails."""
        from gateway.backend import rpc_error_to_api

        if self._closing:
            closing, self._closing = self._closing, []
            for k in closing:
                batch.entries.add(key=k, close=True)
        if self._call is None:
            self._call = self._stub.DetokenizeBatch()
        call = self._call
        try:
            await call.write(batch)
            self.messages_sent += 1
            resp = await call.read()
        except grpc.RpcError as e:
            self._reset()
            raise rpc_error_to_api(e, "tokenizer") from None
        if resp is grpc.aio.EOF:
            self._reset()
            raise APIError(503, "The tokenizer service ended the detokenize stream.", code="service_unavailable")
        return list(resp.results)

    def _reset(self) -> None:
        """A broken stream: the next batch opens a new one (the tokenizer dropped every key's state)."""
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self._closing = []

    def close(self) -> None:
        self._reset()
