"""One prompt's generation: a request on the worker's multiplexed scheduler stream
(gateway/step_stream.py; n samples, demultiplexed by index) whose tokens the stream's per-step
DetokenizeBatch turns into text deltas, watching for stop strings.

    start()   adds the request to the stream and waits until the scheduler admitted it, so that
              admission errors (400 / 429 / 503) surface before any HTTP header is sent;
    events()  yields SampleEvent(index, text, token_ids, logprobs, finish_reason, stop_reason);
    close()   aborts the request in the scheduler if it is still running (client disconnect: its
              blocks are freed within a step) and drops its detokenizer state.

The stream's reader calls `on_output` once per sample per engine step; it only updates this
generation's state and queues an event (no await, no per-token round trip).

Replicas (gateway/routing/): start() takes the replica the routing policy picks. A generation that has
produced no token yet when its replica fails (503: the stream broke, the executor is gone; 429: its
queue is full) moves to another healthy replica, before or after admission. One that has produced
tokens is resumed by replay on another replica when that continues it exactly (greedy, no stop
strings: gateway/routing/resume.py); otherwise it ends with a 503 saying so (in-band when streaming).

A stop string found by the detokenizer finishes that sample at once (text trimmed as OpenAI does,
tokens after it dropped, finish_reason "stop") and is reported to the scheduler in-band (abort with
stop_str and the sample's index), which frees the sample's blocks and sends its final message
(usage). Tokens the scheduler produced after the stop (one step's worth at most) are not counted.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace

from engine_core.sampling_params import SamplingParams
from gateway.backend import Backend
from gateway.errors import APIError, request_timed_out
from gateway.metrics import WINDOW, GatewayMetrics
from gateway.params import to_proto
from gateway.routing.replica import Replica
from gateway.routing.resume import continuation, resumable
from gateway.telemetry import REQUEST_START
from services import tracing
from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2, tokenizer_pb2

logger = logging.getLogger(__name__)

STOP_FINAL_TIMEOUT_S = 2.0
_MAX_SAMPLES = 1 << 16  # detokenizer key = stream key * _MAX_SAMPLES + sample index

_FINISH = {
    scheduler_pb2.FINISH_REASON_STOP: "stop",
    scheduler_pb2.FINISH_REASON_LENGTH: "length",
}
_CHANGED = object()  # queued when a sample's state changed without an event (events() re-checks)
_MOVABLE = (503, 429)  # failures a generation without tokens escapes by moving to another replica


@dataclass
class SampleEvent:
    index: int  # the sample's index within its prompt (0 .. n-1)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Sample:
    __slots__ = ("detok_open", "done", "final", "last_token_at", "num_tokens", "reason", "stopped")

    def __init__(self) -> None:
        self.detok_open = False  # the tokenizer holds this sample's detokenizer state
        self.num_tokens = 0     # output tokens consumed (up to the one completing a stop string)
        self.stopped = False    # a stop string matched; waiting for the scheduler's final message
        self.done = False       # the scheduler's final message for this sample arrived
        self.final: scheduler_pb2.GenerateResponse | None = None
        self.reason: str | None = None  # finish reason as the client saw it (metrics)
        self.last_token_at: float | None = None  # perf_counter() of the last token-bearing message


class PromptGeneration:
    """A StreamClient of the worker's StepStream (gateway/step_stream.py)."""

    def __init__(self, backend: Backend, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                 *, want_logprobs: bool, priority: int = 0, timeout_s: float | None = None) -> None:
        self.backend = backend
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.want_logprobs = want_logprobs
        self.priority, self.timeout_s = priority, timeout_s  # GenerateRequest.priority / timeout_s
        self.samples = [_Sample() for _ in range(params.n)]
        self._key: int | None = None
        self._replica: Replica | None = None  # where it runs (gateway/routing/)
        self._tried: list[Replica] = []  # replicas that failed it before its first token
        self._request: scheduler_pb2.GenerateRequest | None = None
        self._metadata: list[tuple[str, str]] | None = None
        # The tokens streamed so far, kept only when a failed replica's generation can be resumed.
        self._produced: list[int] | None = [] if resumable(params) else None
        self._admitted: asyncio.Future | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._closed = False
        self._detok_options = tokenizer_pb2.DetokenizeOptions(
            prompt_token_ids=self.prompt_token_ids[-8:], skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        # Observability: arrival of the HTTP request, the parent trace context (the request's span),
        # this generation's span, and whether its metrics were recorded (once, at close()).
        self._arrival = REQUEST_START.get() or time.perf_counter()
        self._first_token_at: float | None = None
        self._started = False
        self._recorded = False
        self._parent_ctx = otel_context.get_current() if tracing.enabled() else None
        self._gen_span: trace.Span | None = None
        self._itl = None  # the inter-token-latency histogram child of this model
        self._detok_span: trace.Span | None = None  # from the first DetokenizeBatch entry to close()
        self._detok_batches = 0  # DetokenizeBatch entries of this request (steps x samples)

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
        """Add the request to the scheduler stream; return once it is admitted (or raise its error)."""
        if self._parent_ctx is not None:
            self._gen_span = tracing.tracer().start_span(
                "generate", context=self._parent_ctx, kind=trace.SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.method": "pagedserve.v1.Scheduler/GenerateStream",
                            "pagedserve.request_id": self.request_id,
                            "pagedserve.prompt_tokens": len(self.prompt_token_ids), "pagedserve.n": self.params.n})
            metadata = tracing.grpc_metadata(trace.set_span_in_context(self._gen_span))
        else:
            metadata = tracing.grpc_metadata()
        self._request = scheduler_pb2.GenerateRequest(request_id=self.request_id,
                                                      prompt_token_ids=self.prompt_token_ids,
                                                      sampling_params=to_proto(self.params), priority=self.priority,
                                                      timeout_s=self.timeout_s)
        self._metadata = metadata
        while True:
            self._admitted = asyncio.get_running_loop().create_future()
            self._submit()
            error = await self._admitted
            if error is None:
                break
            if not self._move_off(error):
                raise error
        self._started = True

    def _submit(self) -> None:
        """Send the request to the replica the routing policy picks (not one that failed it)."""
        self._replica = self.backend.replicas.acquire(self._request.prompt_token_ids, exclude=self._tried)
        self._key = self._replica.step_stream.add(self, self._request, self._metadata)

    def _move_off(self, error: APIError) -> bool:
        """Leave the current replica after `error` if another healthy one can take the request
        (it has no token yet). The failed call is already off the replica's stream."""
        r = self._replica
        if r is None or self._closed or error.status not in _MOVABLE or self._first_token_at is not None:
            return False
        if not self.backend.replicas.has_alternative([*self._tried, r]):
            return False
        logger.info("%s: replica %s failed it before its first token (%s); moving it to another replica",
                    self.request_id, r.address, error.message)
        self._tried.append(r)
        r.step_stream.forget(self._key)
        self.backend.replicas.release(r, moved=True)
        self._replica, self._key = None, None
        return True

    def _resume(self, error: APIError) -> bool:
        """Replay a generation that had tokens on a failed replica on another one: prompt + the tokens
        streamed so far as its prompt, the rest of the budget as its own (gateway/routing/resume.py)."""
        r, s, produced = self._replica, self.samples[0], self._produced
        if (produced is None or not produced or r is None or self._closed or error.status != 503 or s.done
                or s.stopped or not self.backend.replicas.has_alternative([*self._tried, r])):
            return False
        rest = continuation(self.params, len(produced))
        if rest.max_tokens is not None and rest.max_tokens <= 0:
            return False
        logger.info("%s: replica %s failed after %d tokens (%s); resuming it on another replica by replay",
                    self.request_id, r.address, len(produced), error.message)
        self._tried.append(r)
        r.step_stream.forget(self._key)
        if s.detok_open:  # the new stream's detokenizer starts from the tail of prompt + output
            r.step_stream.detok.close_key(self._key * _MAX_SAMPLES)
            s.detok_open = False
        self.backend.replicas.release(r, moved=True)
        self._replica, self._key = None, None
        prompt = self.prompt_token_ids + produced
        del self._detok_options.prompt_token_ids[:]
        self._detok_options.prompt_token_ids.extend(prompt[-8:])
        timeout = self.timeout_s
        if timeout:  # the deadline does not restart: what is left of it (a moment at least)
            timeout = max(1e-3, timeout - (time.perf_counter() - self._arrival))
        self._request = scheduler_pb2.GenerateRequest(request_id=self.request_id, prompt_token_ids=prompt,
                                                      sampling_params=to_proto(rest), priority=self.priority,
                                                      timeout_s=timeout)
        try:
            self._submit()
        except APIError as e:
            self._events.put_nowait(e)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._key is not None and self._replica is not None:
                stream = self._replica.step_stream
                if not all(s.done for s in self.samples):
                    stream.abort(self._key)  # frees the blocks now (idempotent in the scheduler)
                stream.forget(self._key)
                for i, s in enumerate(self.samples):
                    if s.detok_open:
                        stream.detok.close_key(self._key * _MAX_SAMPLES + i)
            if self._replica is not None:
                self.backend.replicas.release(self._replica)
        if self._admitted is not None and not self._admitted.done():
            self._admitted.cancel()
        if not self._recorded:
            self._recorded = True
            self._record()

    # ------------------------------------------------------------------ StreamClient
    def on_admitted(self) -> None:
        if self._admitted is not None and not self._admitted.done():
            self._admitted.set_result(None)

    def on_failed(self, error: APIError) -> None:
        if self._admitted is not None and not self._admitted.done():
            self._admitted.set_result(error)
            return
        if self._move_off(error):
            try:
                self._submit()
            except APIError as e:
                self._events.put_nowait(e)
            return
        if self._resume(error):
            return
        if self._first_token_at is not None and error.status == 503 and self._replica is not None:
            error = APIError(503, f"The scheduler replica {self._replica.address} failed after this request had "
                                  f"produced tokens ({error.message}); they cannot be resumed elsewhere: retry the "
                                  f"request.", code="service_unavailable")
        self._events.put_nowait(error)

    def detok_entry(self, entries, index: int, token_ids: list[int],
                    final: scheduler_pb2.GenerateResponse | None) -> bool:
        """Add the DetokenizeBatch entry this output needs to `entries`; False: no text to make."""
        if not 0 <= index < len(self.samples):
            return False
        s = self.samples[index]
        if s.done or s.stopped or (not token_ids and (final is None or not s.detok_open)):
            return False
        if final is not None and final.finish_reason in (scheduler_pb2.FINISH_REASON_ERROR,
                                                         scheduler_pb2.FINISH_REASON_ABORT):
            return False
        e = entries.add(key=self._key * _MAX_SAMPLES + index, token_ids=token_ids, finished=final is not None)
        self._detok_batches += 1
        if not s.detok_open:
            s.detok_open = True
            e.options.CopyFrom(self._detok_options)
            if self._parent_ctx is not None:
                if self._detok_span is None:  # one span for all of the request's samples
                    self._detok_span = tracing.tracer().start_span(
                        "detokenize", context=self._parent_ctx, kind=trace.SpanKind.CLIENT,
                        attributes={"rpc.system": "grpc", "rpc.method": "pagedserve.v1.Tokenizer/DetokenizeBatch"})
                e.trace_context.update(tracing.carrier(trace.set_span_in_context(self._detok_span)))
        if final is not None:
            s.detok_open = False  # the tokenizer drops a finished key's state
        return True

    def on_output(self, index: int, token_ids: list[int], logprobs: list[common_pb2.TokenLogprobs] | None,
                  final: scheduler_pb2.GenerateResponse | None, text: tokenizer_pb2.DetokenizeResult | None) -> None:
        if self._closed:
            return
        try:
            ev = self._handle(index, token_ids, logprobs if self.want_logprobs else None, final, text)
        except APIError as e:
            self._events.put_nowait(e)
            return
        self._events.put_nowait(_CHANGED if ev is None else ev)

    # ------------------------------------------------------------------ observability
    def _record(self) -> None:
        """Metrics and spans of this generation, once, when it is closed (however it ended)."""
        now = time.perf_counter()
        completion = self.completion_tokens
        for span, extra in ((self._detok_span, {"pagedserve.detokenize_batches": self._detok_batches}),
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
        if self._first_token_at is None:
            self._first_token_at = now
            ttft = now - self._arrival
            GatewayMetrics.get().ttft.labels(self.backend.model_label).observe(ttft)
            WINDOW.add_ttft(ttft)
        elif s.last_token_at is not None:
            gap = (now - s.last_token_at) / n
            itl = self._itl
            if itl is None:  # the labelled child, looked up once per request (not per token)
                itl = self._itl = GatewayMetrics.get().itl.labels(self.backend.model_label)
            for _ in range(n):
                itl.observe(gap)
                WINDOW.add_itl(gap)
        s.last_token_at = now

    async def events(self) -> AsyncIterator[SampleEvent]:
        assert self._started, "start() first"
        deadline: float | None = None  # for the final messages of stopped samples
        loop = asyncio.get_running_loop()
        while True:
            # The stream's reader updates the samples ahead of us: finish only once their events
            # are all out.
            if not self._events.empty():
                item = self._events.get_nowait()
            elif all(s.done for s in self.samples):
                return
            elif all(s.done or s.stopped for s in self.samples):
                # Only stopped samples left: their final message (usage) follows our abort within a
                # step. Don't wait for a scheduler that missed it: close() aborts again.
                if deadline is None:
                    deadline = loop.time() + STOP_FINAL_TIMEOUT_S
                try:
                    item = await asyncio.wait_for(self._events.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    logger.warning("%s: no final message after the stop-string abort; closing", self.request_id)
                    return
            else:
                item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            if item is not _CHANGED:
                yield item

    # ------------------------------------------------------------------ one output
    def _handle(self, idx: int, ids: list[int], lps: list | None, msg: scheduler_pb2.GenerateResponse | None,
                d: tokenizer_pb2.DetokenizeResult | None) -> SampleEvent | None:
        if not 0 <= idx < len(self.samples):
            raise APIError(500, f"The scheduler sent sample index {idx} for a request with n={len(self.samples)}.")
        s = self.samples[idx]
        if s.done:
            return None
        final = msg is not None
        fr = msg.finish_reason if final else scheduler_pb2.FINISH_REASON_UNSPECIFIED
        if fr == scheduler_pb2.FINISH_REASON_ERROR:
            s.reason = "error"
            raise APIError(500, f"Generation failed: {msg.error_message or 'engine error'}", code="engine_error")
        if s.stopped:  # tokens past our stop string; wait for the final message (usage)
            if final:
                s.done, s.final = True, msg
            return None
        if fr == scheduler_pb2.FINISH_REASON_ABORT and msg.error_message:
            # The scheduler ended it itself: its timeout passed. The sample finishes as "abort" (its
            # tokens so far were streamed already), then the request fails with the reason (a 504, or
            # an in-band error event after that last chunk when streaming).
            s.reason = "abort"
            s.done, s.final = True, msg
            self._events.put_nowait(SampleEvent(idx, "", [], None, "abort"))
            raise request_timed_out(msg.error_message)
        if fr == scheduler_pb2.FINISH_REASON_ABORT:
            s.reason = "abort"
            raise APIError(503, "The scheduler aborted the request (is it shutting down?).",
                           code="service_unavailable")
        if not ids and not final:
            return None
        if d is None:  # final message, no text ever: nothing to detokenize
            d = tokenizer_pb2.DetokenizeResult(finished=True)
        elif d.error:
            raise APIError(400, d.error, code="invalid_value")
        if d.stop_str:
            keep = max(0, d.num_output_tokens - s.num_tokens)
            ids = ids[:keep]
            if lps is not None:
                lps = lps[:keep]
            s.num_tokens += len(ids)
            if ids:
                self._tokens_arrived(s, len(ids))
            s.stopped = True
            s.detok_open = False  # the tokenizer ended this key
            s.reason = "stop"
            if final:
                s.done, s.final = True, msg
            else:
                self._replica.step_stream.abort(self._key, stop_str=d.stop_str, indices=(idx,))
            return SampleEvent(idx, d.text, ids, lps, "stop", d.stop_str)
        s.num_tokens += len(ids)
        if ids:
            self._tokens_arrived(s, len(ids))
            if self._produced is not None:
                self._produced.extend(ids)
        if not final:
            return SampleEvent(idx, d.text, ids, lps)
        s.done, s.final = True, msg
        reason = _FINISH.get(fr, "stop")
        s.reason = reason
        which = msg.WhichOneof("stop_reason")
        stop_reason = getattr(msg, which) if which else None
        facts = self.backend.cached_facts
        if which == "stop_token_id" and facts is not None and stop_reason in facts.extra_eos_token_ids:
            stop_reason = None  # an EOS token, reported as EOS is (gateway/backend.py: extra_eos_token_ids)
        return SampleEvent(idx, d.text, ids, lps, reason, stop_reason)


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
