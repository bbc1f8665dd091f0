"""One prompt's generation: a scheduler Generate call (n samples, demultiplexed by
GenerateResponse.index) plus, per sample, a tokenizer DetokenizeStream that turns token ids into text
deltas and watches for stop strings.

    start()   opens the Generate call and waits for its first message, so that admission errors
              (400 / 429 / 503) surface before any HTTP header is sent;
    events()  yields SampleEvent(index, text, token_ids, logprobs, finish_reason, stop_reason);
    close()   cancels whatever is still open: a cancelled Generate call makes the scheduler abort the
              request and free its blocks (client disconnect), a cancelled DetokenizeStream frees
              the tokenizer's state.

A stop string found by the detokenizer finishes that sample at once (text trimmed as OpenAI does,
tokens after it dropped, finish_reason "stop") and is reported to the scheduler with
Abort(stop_str, indices=[i]), which frees the sample's blocks and sends its final message (usage).
Tokens the scheduler produced after the stop (one step's worth at most) are not counted.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from engine_core.sampling_params import SamplingParams
from gateway.backend import Backend, rpc_error_to_api
from gateway.errors import APIError
from gateway.metrics import WINDOW, GatewayMetrics
from gateway.params import to_proto
from gateway.telemetry import REQUEST_START
from services import tracing
from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2, tokenizer_pb2

logger = logging.getLogger(__name__)

# Initial-metadata key a scheduler may send as soon as it admits a request (before the first token):
# the gateway then sends the SSE headers at once instead of after the first token.
ACCEPTED_METADATA_KEY = "pagedserve-accepted"

DRAIN_TIMEOUT_S = 1.0
STOP_FINAL_TIMEOUT_S = 2.0

_FINISH = {
    scheduler_pb2.FINISH_REASON_STOP: "stop",
    scheduler_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass
class SampleEvent:
    index: int  # the sample's index within its prompt (0 .. n-1)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Sample:
    __slots__ = ("call", "done", "final", "last_token_at", "num_tokens", "reason", "stopped")

    def __init__(self) -> None:
        self.call: grpc.aio.StreamStreamCall | None = None
        self.num_tokens = 0     # output tokens consumed (up to the one completing a stop string)
        self.stopped = False    # a stop string matched; waiting for the scheduler's final message
        self.done = False       # the scheduler's final message for this sample arrived
        self.final: scheduler_pb2.GenerateResponse | None = None
        self.reason: str | None = None  # finish reason as the client saw it (metrics)
        self.last_token_at: float | None = None  # perf_counter() of the last token-bearing message


class PromptGeneration:
    def __init__(self, backend: Backend, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                 *, want_logprobs: bool) -> None:
        self.backend = backend
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.want_logprobs = want_logprobs
        self.samples = [_Sample() for _ in range(params.n)]
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._first: scheduler_pb2.GenerateResponse | None = None
        self._first_task: asyncio.Future | None = None
        self._detok_options = tokenizer_pb2.DetokenizeOptions(
            prompt_token_ids=self.prompt_token_ids[-8:], skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        # Observability: arrival of the HTTP request, the parent trace context (the request's span),
        # this generation's spans, and whether its metrics were recorded (once, at close()).
        self._arrival = REQUEST_START.get() or time.perf_counter()
        self._first_token_at: float | None = None
        self._started = False
        self._recorded = False
        self._parent_ctx = otel_context.get_current() if tracing.enabled() else None
        self._gen_span: trace.Span | None = None
        self._detok_span: trace.Span | None = None
        self._detok_md: list[tuple[str, str]] | None = None
        self._detok_busy_s = 0.0
        self._detok_calls = 0

    # ------------------------------------------------------------------ usage
    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(self.sample_tokens(i) for i in range(len(self.samples)))

    def sample_tokens(self, index: int) -> int:
        return self.samples[index].num_tokens

    @property
    def cached_tokens(self) -> int:
        return max((s.final.usage.cached_tokens for s in self.samples if s.final is not None and
                    s.final.HasField("usage")), default=0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the Generate call; return once the scheduler accepted it (or raise its error).

        Acceptance is the first message, or (sooner, for a request that waits in the queue) initial
        metadata carrying ACCEPTED_METADATA_KEY when the scheduler sends it on admission."""
        metadata = None
        if self._parent_ctx is not None:
            self._gen_span = tracing.tracer().start_span(
                "generate", context=self._parent_ctx, kind=trace.SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.method": "pagedserve.v1.Scheduler/Generate",
                            "pagedserve.request_id": self.request_id,
                            "pagedserve.prompt_tokens": len(self.prompt_token_ids), "pagedserve.n": self.params.n})
            metadata = tracing.grpc_metadata(trace.set_span_in_context(self._gen_span))
        else:
            metadata = tracing.grpc_metadata()
        self._call = self.backend.generate(self.request_id, self.prompt_token_ids, to_proto(self.params),
                                           metadata=metadata)
        read = asyncio.ensure_future(self._read())
        meta = asyncio.ensure_future(self._call.initial_metadata())
        meta.add_done_callback(_ignore_result)
        try:
            await asyncio.wait((read, meta), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            read.cancel()
            raise
        if (not read.done() and not meta.cancelled() and meta.exception() is None
                and any(k == ACCEPTED_METADATA_KEY for k, _ in (meta.result() or ()))):
            self._first_task = read
            self._started = True
            return
        self._first = await read
        self._started = True

    async def _read(self) -> scheduler_pb2.GenerateResponse | None:
        try:
            msg = await self._call.read()
        except grpc.RpcError as e:
            raise rpc_error_to_api(e, "scheduler", self.backend.config.retry_after_s) from None
        return None if msg is grpc.aio.EOF else msg

    def close(self) -> None:
        if self._first_task is not None:
            self._first_task.cancel()
        if self._call is not None and not self._call.done():
            self._call.cancel()
        for s in self.samples:
            if s.call is not None and not s.call.done():
                s.call.cancel()
        if not self._recorded:
            self._recorded = True
            self._record()

    # ------------------------------------------------------------------ observability
    def _record(self) -> None:
        """Metrics and spans of this generation, once, when it is closed (however it ended)."""
        now = time.perf_counter()
        completion = self.completion_tokens
        for span, extra in ((self._detok_span, {"pagedserve.detokenize_calls": self._detok_calls,
                                                "pagedserve.detokenize_busy_s": round(self._detok_busy_s, 6)}),
                            (self._gen_span, {"pagedserve.completion_tokens": completion})):
            if span is not None:
                span.set_attributes(extra)
                span.end()
        self._gen_span = self._detok_span = None
        if not self._started:  # refused (400 / 429 / 503): only the HTTP status counts
            return
        m = GatewayMetrics.get()
        model = self.backend.model_label
        m.prompt_tokens.labels(model).inc(len(self.prompt_token_ids))
        m.generation_tokens.labels(model).inc(completion)
        m.request_prompt_tokens.labels(model).observe(len(self.prompt_token_ids))
        m.request_generation_tokens.labels(model).observe(completion)
        e2e = now - self._arrival
        m.e2e.labels(model).observe(e2e)
        WINDOW.add_e2e(e2e)
        for s in self.samples:
            m.request_success.labels(model, s.reason or "abort").inc()
            fm = s.final.metrics if s.final is not None and s.final.HasField("metrics") else None
            if fm is not None:
                m.queue_time.labels(model).observe(fm.queue_time_s)
                if fm.time_to_first_token_s:
                    m.prefill_time.labels(model).observe(fm.prefill_time_s)
                    m.decode_time.labels(model).observe(fm.decode_time_s)

    def _tokens_arrived(self, s: _Sample, n: int) -> None:
        now = time.perf_counter()
        model = self.backend.model_label
        m = GatewayMetrics.get()
        if self._first_token_at is None:
            self._first_token_at = now
            ttft = now - self._arrival
            m.ttft.labels(model).observe(ttft)
            WINDOW.add_ttft(ttft)
        elif s.last_token_at is not None:
            gap = (now - s.last_token_at) / n
            itl = m.itl.labels(model)
            for _ in range(n):
                itl.observe(gap)
                WINDOW.add_itl(gap)
        s.last_token_at = now

    async def events(self) -> AsyncIterator[SampleEvent]:
        assert self._call is not None, "start() first"
        if self._first_task is not None:
            task, self._first_task = self._first_task, None
            msg = await task
        else:
            msg, self._first = self._first, None
        deadline: float | None = None  # for the final messages of stopped samples
        while True:
            if msg is None:
                if all(s.done for s in self.samples):
                    return
                raise APIError(503, "The scheduler ended the request's stream before it finished.",
                               code="service_unavailable")
            ev = await self._handle(msg)
            if ev is not None:
                yield ev
            if all(s.done for s in self.samples):
                await self._drain()
                return
            if all(s.done or s.stopped for s in self.samples):
                # Only stopped samples left: their final message (usage) follows our Abort within a
                # step. Don't wait for a scheduler that missed the Abort: close() cancels the call.
                loop = asyncio.get_running_loop()
                if deadline is None:
                    deadline = loop.time() + STOP_FINAL_TIMEOUT_S
                try:
                    msg = await asyncio.wait_for(self._read(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    logger.warning("%s: no final message after Abort(stop_str); cancelling", self.request_id)
                    return
            else:
                msg = await self._read()

    async def _drain(self) -> None:
        """Every sample finished: read the call's end (its OK status) so that close() has nothing to
        cancel; a scheduler that does not end the stream promptly gets cancelled by close()."""
        try:
            await asyncio.wait_for(self._call.read(), DRAIN_TIMEOUT_S)
        except (TimeoutError, grpc.RpcError):
            pass

    # ------------------------------------------------------------------ one message
    async def _detok(self, s: _Sample, ids: list[int], final: bool) -> tokenizer_pb2.DetokenizeResponse:
        req = tokenizer_pb2.DetokenizeRequest(token_ids=ids, finished=final)
        t0 = time.perf_counter()
        try:
            if s.call is None:
                if self._detok_md is None:
                    if self._parent_ctx is not None:  # one aggregated span for every sample's stream
                        self._detok_span = tracing.tracer().start_span(
                            "detokenize", context=self._parent_ctx, kind=trace.SpanKind.CLIENT,
                            attributes={"rpc.system": "grpc", "rpc.method": "pagedserve.v1.Tokenizer/DetokenizeStream"})
                        self._detok_md = tracing.grpc_metadata(trace.set_span_in_context(self._detok_span)) or []
                    else:
                        self._detok_md = tracing.grpc_metadata() or []
                s.call = self.backend.detokenize_stream(metadata=self._detok_md or None)
                req.options.CopyFrom(self._detok_options)
            await s.call.write(req)
            resp = await s.call.read()
        except grpc.RpcError as e:
            raise rpc_error_to_api(e, "tokenizer") from None
        finally:
            self._detok_busy_s += time.perf_counter() - t0
            self._detok_calls += 1
        if resp is grpc.aio.EOF:
            raise APIError(503, "The tokenizer service ended a detokenize stream early.", code="service_unavailable")
        return resp

    async def _handle(self, msg: scheduler_pb2.GenerateResponse) -> SampleEvent | None:
        idx = msg.index
        if not 0 <= idx < len(self.samples):
            raise APIError(500, f"The scheduler sent sample index {idx} for a request with n={len(self.samples)}.")
        s = self.samples[idx]
        if s.done:
            return None
        fr = msg.finish_reason
        final = fr != scheduler_pb2.FINISH_REASON_UNSPECIFIED
        if fr == scheduler_pb2.FINISH_REASON_ERROR:
            s.reason = "error"
            raise APIError(500, f"Generation failed: {msg.error_message or 'engine error'}", code="engine_error")
        if s.stopped:  # tokens past our stop string; wait for the final message (usage)
            if final:
                s.done, s.final = True, msg
            return None
        if fr == scheduler_pb2.FINISH_REASON_ABORT:
            s.reason = "abort"
            raise APIError(503, "The scheduler aborted the request (is it shutting down?).",
                           code="service_unavailable")
        ids = list(msg.token_ids)
        lps = list(msg.logprobs) if self.want_logprobs else None
        if not ids and not final:
            return None
        if not ids and s.call is None:  # final message, no text ever: nothing to detokenize
            d = tokenizer_pb2.DetokenizeResponse(finished=True)
        else:
            d = await self._detok(s, ids, final)
        if d.stop_str:
            keep = max(0, d.num_output_tokens - s.num_tokens)
            ids = ids[:keep]
            if lps is not None:
                lps = lps[:keep]
            s.num_tokens += len(ids)
            if ids:
                self._tokens_arrived(s, len(ids))
            s.stopped = True
            s.reason = "stop"
            if final:
                s.done, s.final = True, msg
            else:
                await self.backend.abort([self.request_id], stop_str=d.stop_str, indices=[idx])
            return SampleEvent(idx, d.text, ids, lps, "stop", d.stop_str)
        s.num_tokens += len(ids)
        if ids:
            self._tokens_arrived(s, len(ids))
        if not final:
            return SampleEvent(idx, d.text, ids, lps)
        s.done, s.final = True, msg
        reason = _FINISH.get(fr, "stop")
        s.reason = reason
        which = msg.WhichOneof("stop_reason")
        stop_reason = getattr(msg, which) if which else None
        return SampleEvent(idx, d.text, ids, lps, reason, stop_reason)


def _ignore_result(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning


async def start_all(gens: Sequence[PromptGeneration]) -> None:
    """Start every generation concurrently; on any failure close them all and raise the first error."""
    try:
        results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    except BaseException:  # cancelled (client gone): nothing may stay open
        for g in gens:
            g.close()
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for g in gens:
            g.close()
        raise errors[0]


async def merge_events(gens: Sequence[PromptGeneration]) -> AsyncIterator[tuple[int, SampleEvent]]:
    """(prompt index, event) from every generation as they come. One generation: no tasks at all."""
    if len(gens) == 1:
        async for ev in gens[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: PromptGeneration) -> None:
        try:
            async for ev in g.events():
                await queue.put((i, ev))
            await queue.put((i, done))
        except Exception as e:  # noqa: BLE001 (delivered to the consumer)
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
