"""Output routing for the EngineLoop: a step's deltas grouped by sink (one `deliver` per Generate
call or GenerateStream per step, not one message per request x token), final messages with
usage and timings, and failing requests in-band or with a call status. A mixin: the state lives
on the EngineLoop."""
from __future__ import annotations

import logging
import time

import grpc

from engine_core.request import Request, RequestStatus
from engine_core.scheduler import RequestOutputDelta
from services.gen.pagedserve.v1 import scheduler_pb2
from services.scheduler.sinks import CallFailed, CallSink, SampleDelta, StreamSink

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    None: scheduler_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": scheduler_pb2.FINISH_REASON_STOP,
    "length": scheduler_pb2.FINISH_REASON_LENGTH,
    "abort": scheduler_pb2.FINISH_REASON_ABORT,
    "error": scheduler_pb2.FINISH_REASON_ERROR,
}


class OutputRouting:
    """EngineLoop methods that turn engine outputs into sink deliveries."""

    def _route(self, deltas: list[RequestOutputDelta]) -> None:
        """One `deliver` per sink for the whole step (not one message per request x token)."""
        now = time.monotonic()
        batches: dict[int, tuple[CallSink | StreamSink, list[SampleDelta]]] = {}
        for d in deltas:
            route = self._routes.get(d.request_id)
            if route is None:
                continue
            final = None
            if d.finished:
                del self._routes[d.request_id]
                final = scheduler_pb2.GenerateResponse(index=route.index, finish_reason=FINISH_REASONS[d.finish_reason],
                                                       error_message=d.error_message or "")
                self._finish_message(final, d, route.request, now)
            self._batch(batches, SampleDelta(route.call, route.index, d.new_token_ids, d.new_logprobs, final))
        self._deliver(batches)

    @staticmethod
    def _batch(batches: dict, item: SampleDelta) -> None:
        sink = item.call.sink
        entry = batches.get(id(sink))
        if entry is None:
            entry = batches[id(sink)] = (sink, [])
        entry[1].append(item)

    def _deliver(self, batches: dict) -> None:
        for sink, items in batches.values():
            self._post(sink.deliver, items)

    @staticmethod
    def _finish_message(msg: scheduler_pb2.GenerateResponse, d: RequestOutputDelta, req: Request,
                        now: float) -> None:
        if isinstance(d.stop_reason, str):
            msg.stop_str = d.stop_reason
        elif isinstance(d.stop_reason, int):
            msg.stop_token_id = d.stop_reason
        msg.usage.prompt_tokens = d.num_prompt_tokens
        msg.usage.completion_tokens = d.num_output_tokens
        msg.usage.cached_tokens = d.num_cached_tokens
        m = msg.metrics
        arrival = req.arrival_time
        m.e2e_latency_s = now - arrival
        m.num_preemptions = req.num_preemptions
        if req.first_scheduled_time is not None:
            m.queue_time_s = req.first_scheduled_time - arrival
        if req.first_token_time is not None:
            m.time_to_first_token_s = req.first_token_time - arrival
            m.decode_time_s = now - req.first_token_time
            if req.first_scheduled_time is not None:
                m.prefill_time_s = req.first_token_time - req.first_scheduled_time

    def _fail_all(self, message: str, code: grpc.StatusCode | None = None,
                  only: list[str] | None = None) -> None:
        """Finish unfinished requests as errors: in-band FINISH_REASON_ERROR + message, or (code
        set) end their calls with that gRPC status."""
        core = self.core
        # Sequence groups' output ids first: their hidden members then go with them.
        ids = list(core.scheduler.groups.by_output_id) + list(core.scheduler.requests) if only is None else only
        if not ids:
            return
        logger.error("failing %d requests: %s", len(ids), message)
        done = core.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
        now = time.monotonic()
        failed_calls: set[int] = set()
        batches: dict = {}
        for req in done:
            route = self._routes.pop(req.request_id, None)
            if route is None:
                continue
            if code is not None:
                if id(route.call) not in failed_calls:
                    failed_calls.add(id(route.call))
                    self._post(route.call.sink.fail, route.call, CallFailed(code, message))
                continue
            d = core.scheduler.abort_delta(req)
            msg = scheduler_pb2.GenerateResponse(index=route.index, finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                                 error_message=message)
            self._finish_message(msg, d, req, now)
            self._batch(batches, SampleDelta(route.call, route.index, [], None, msg))
        self._deliver(batches)
        self._publish_queues()
