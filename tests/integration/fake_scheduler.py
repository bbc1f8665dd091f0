"""A deterministic in-process Scheduler servicer (grpc.aio) for gateway tests: no model, instant.

Sample i of a request emits SCRIPT[(offset + step) % len(SCRIPT)], where SCRIPT is the token ids of
a fixed text (real SmolLM2 tokens, so the real tokenizer service detokenizes them, emoji included)
and offset = 0 when greedy, else (seed or a counter) * 7 + i (so seeds reproduce, n samples differ).
Honours max_tokens (LENGTH), stop_token_ids and EOS (STOP), logprobs (fake values), Abort with
stop_str / indices, cancellation (recorded), and a queue limit (RESOURCE_EXHAUSTED when more than
`max_in_flight` calls are open). accepted_metadata: send `pagedserve-accepted` initial metadata on
admission (before the first token, which comes after first_token_delay_s). ignore_abort: Abort
is a no-op (the gateway must not wait for a final message that never comes). seed == ERROR_SEED: the engine "fails" after two tokens
(FINISH_REASON_ERROR, in-band).

GenerateStream (what the gateway uses) runs each added request through the same Generate logic
and sends everything that is ready as one message; a request counts as admitted at its initial
metadata (accepted_metadata) or first message, as a Generate caller would see it.
"""
from __future__ import annotations

import asyncio
import itertools

import grpc

from services.gen.pagedserve.v1 import (
    common_pb2,
    executor_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.scheduler.calls import scheduling_error

ERROR_SEED = 666
SCRIPT_TEXT = " The quick brown fox jumps over the lazy dog. Café 😀 naïve — 你好!"


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, script: list[int], *, vocab_size: int, eos_token_id: int, max_model_len: int = 256,
                 model_name: str = "fake-model", token_delay_s: float = 0.002, max_in_flight: int = 0,
                 first_token_delay_s: float = 0.0, accepted_metadata: bool = False,
                 ignore_abort: bool = False, max_queue_len: int = 0, scheduling_policy: str = "fcfs") -> None:
        self.scheduling_policy = scheduling_policy  # priority / timeout_s are checked as the real one does
        self.script = script
        self.max_queue_len = max_queue_len  # reported by GetStats (the gateway's capacity check)
        self.vocab_size = vocab_size
        self.eos = eos_token_id
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.token_delay_s = token_delay_s
        self.max_in_flight = max_in_flight
        self.first_token_delay_s = first_token_delay_s
        self.accepted_metadata = accepted_metadata
        self.ignore_abort = ignore_abort  # an old scheduler: Abort does nothing
        self.running: dict[str, int] = {}  # request id -> live samples
        self.aborts: dict[str, tuple[str | None, set[int] | None]] = {}
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.requests: list[scheduler_pb2.GenerateRequest] = []
        self.abort_calls: list[scheduler_pb2.AbortRequest] = []
        self._counter = itertools.count(1)

    @classmethod
    def for_tokenizer(cls, tok, **kw) -> FakeScheduler:
        """A fake whose script is SCRIPT_TEXT in `tok`'s tokens, with its vocabulary and EOS."""
        return cls(tok.encode(SCRIPT_TEXT, add_special_tokens=False), vocab_size=tok.vocab_size,
                   eos_token_id=tok.eos_token_ids[0], **kw)

    def tokens_for(self, sp: common_pb2.SamplingParams, index: int) -> itertools.cycle:
        temp = sp.temperature if sp.HasField("temperature") else 1.0
        if temp < 1e-5:
            offset = 0
        else:
            base = sp.seed if sp.HasField("seed") else next(self._counter) * 1000
            offset = (base * 7 + index) % len(self.script)
        return itertools.islice(itertools.cycle(self.script), offset, None)

    async def Generate(self, request, context):
        rid = request.request_id
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: at least one token is required")
        if rid in self.running:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is already in flight")
        if self.max_in_flight and len(self.running) >= self.max_in_flight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the scheduler's waiting queue is full (1 requests)")
        sp = request.sampling_params
        n = sp.n if sp.HasField("n") else 1
        if len(request.prompt_token_ids) >= self.max_model_len:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
        why = scheduling_error(request, self.scheduling_policy)
        if why is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_s if request.HasField("timeout_s") and request.timeout_s else None
        self.requests.append(request)
        max_tokens = sp.max_tokens if sp.HasField("max_tokens") else 16
        k = sp.logprobs if sp.HasField("logprobs") else None
        streams = [self.tokens_for(sp, i) for i in range(n)]
        live = set(range(n))
        counts = [0] * n
        self.running[rid] = n
        completed = False
        try:
            if self.accepted_metadata:
                await context.send_initial_metadata((("pagedserve-accepted", "1"),))
            await asyncio.sleep(self.first_token_delay_s)
            while live:
                await asyncio.sleep(self.token_delay_s)
                if deadline is not None and loop.time() >= deadline:  # timed out: as the real scheduler says it
                    for i in sorted(live):
                        yield scheduler_pb2.GenerateResponse(
                            index=i, finish_reason=scheduler_pb2.FINISH_REASON_ABORT,
                            error_message=f"request timed out: timeout {request.timeout_s:g}s; "
                                          f"{counts[i]} tokens were generated",
                            usage=scheduler_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                      completion_tokens=counts[i]))
                    live.clear()
                    break
                for i in sorted(live):
                    ab = self.aborts.get(rid)
                    if ab is not None and (ab[1] is None or i in ab[1]):
                        live.discard(i)
                        stop_str = ab[0]
                        msg = scheduler_pb2.GenerateResponse(
                            index=i, usage=scheduler_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                               completion_tokens=counts[i], cached_tokens=3))
                        if stop_str is not None:
                            msg.finish_reason = scheduler_pb2.FINISH_REASON_STOP
                            msg.stop_str = stop_str
                        else:
                            msg.finish_reason = scheduler_pb2.FINISH_REASON_ABORT
                        yield msg
                        continue
                    if sp.HasField("seed") and sp.seed == ERROR_SEED and counts[i] >= 2:
                        live.discard(i)
                        yield scheduler_pb2.GenerateResponse(index=i, finish_reason=scheduler_pb2.FINISH_REASON_ERROR,
                                                             error_message="simulated device failure")
                        continue
                    tok = next(streams[i])
                    counts[i] += 1
                    msg = scheduler_pb2.GenerateResponse(index=i, token_ids=[tok])
                    if k is not None:
                        tops = [(tok + j) % self.vocab_size for j in range(k)]
                        msg.logprobs.append(common_pb2.TokenLogprobs(
                            token_id=tok, logprob=-0.25, rank=1, top_token_ids=tops,
                            top_logprobs=[-0.25 - j for j in range(k)]))
                    if tok in sp.stop_token_ids:
                        msg.finish_reason = scheduler_pb2.FINISH_REASON_STOP
                        msg.stop_token_id = tok
                    elif tok == self.eos and not sp.ignore_eos:
                        msg.finish_reason = scheduler_pb2.FINISH_REASON_STOP
                    elif max_tokens and counts[i] >= max_tokens:
                        msg.finish_reason = scheduler_pb2.FINISH_REASON_LENGTH
                    if msg.finish_reason:
                        live.discard(i)
                        msg.usage.CopyFrom(scheduler_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                               completion_tokens=counts[i], cached_tokens=3))
                    yield msg
            completed = True
            self.finished.append(rid)
        finally:
            if not completed:
                self.cancelled.append(rid)
            self.running.pop(rid, None)
            self.aborts.pop(rid, None)

    async def GenerateStream(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        tasks: dict[int, asyncio.Task] = {}
        rids: dict[int, str] = {}

        async def run(add) -> None:
            ctx = _CallContext(lambda: out.put_nowait(("accepted", add.key)))
            try:
                async for msg in self.Generate(add.request, ctx):
                    ctx.accept()
                    out.put_nowait(("out", add.key, msg))
            except _Aborted as e:
                out.put_nowait(("error", add.key, e.code, e.details))

        async def read() -> None:
            async for req in request_iterator:
                for add in req.add:
                    rids[add.key] = add.request.request_id
                    tasks[add.key] = asyncio.ensure_future(run(add))
                for ab in req.abort:
                    if ab.HasField("stop_str") or ab.indices:
                        await self.Abort(scheduler_pb2.AbortRequest(
                            request_ids=[rids.get(ab.key, "")], indices=ab.indices,
                            stop_str=ab.stop_str if ab.HasField("stop_str") else None), context)
                    elif ab.key in tasks:
                        tasks[ab.key].cancel()  # a cancelled Generate call

        reader = asyncio.ensure_future(read())
        try:
            while True:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                msg = scheduler_pb2.GenerateStreamResponse()
                for item in items:
                    if item[0] == "accepted":
                        msg.accepted.append(item[1])
                    elif item[0] == "error":
                        msg.errors.add(key=item[1], code=item[2].value[0], message=item[3])
                    else:
                        msg.outputs.add(key=item[1], response=item[2])
                yield msg
        finally:
            reader.cancel()
            for t in tasks.values():
                t.cancel()

    async def Abort(self, request, context):
        self.abort_calls.append(request)
        aborted, unknown = [], []
        for rid in request.request_ids:
            if rid in self.running and not self.ignore_abort:
                aborted.append(rid)
                stop_str = request.stop_str if request.HasField("stop_str") else None
                prev = self.aborts.get(rid)
                indices = set(request.indices) or None
                if prev is not None and prev[1] is not None and indices is not None:
                    indices |= prev[1]
                self.aborts[rid] = (stop_str, indices)
            else:
                unknown.append(rid)
        return scheduler_pb2.AbortResponse(aborted_request_ids=aborted, unknown_request_ids=unknown)

    async def GetStats(self, request, context):
        return scheduler_pb2.SchedulerStats(num_running=sum(self.running.values()), executor_healthy=True,
                                            num_kv_blocks=64, num_free_blocks=64, max_queue_len=self.max_queue_len)

    async def WatchStats(self, request, context):
        interval = max(0.05, request.interval_s or 1.0)
        while True:
            yield await self.GetStats(request, context)
            await asyncio.sleep(interval)

    async def GetModelInfo(self, request, context):
        return scheduler_pb2.ModelInfo(
            executor=executor_pb2.ExecutorInfo(model_name=self.model_name, vocab_size=self.vocab_size,
                                               max_model_len=self.max_model_len, eos_token_ids=[self.eos]),
            max_num_seqs=64, max_logprobs=20)



class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _CallContext:
    """The bits of a grpc.aio context that Generate uses, for a request on GenerateStream."""

    def __init__(self, on_accept) -> None:
        self._on_accept = on_accept
        self._accepted = False

    def accept(self) -> None:
        if not self._accepted:
            self._accepted = True
            self._on_accept()

    async def send_initial_metadata(self, metadata) -> None:
        self.accept()

    async def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details)
