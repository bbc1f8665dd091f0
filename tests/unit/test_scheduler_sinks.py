"""services/scheduler/sinks.py: how one engine step's outputs become gRPC messages — one
GenerateStreamResponse per step for a whole stream (columnar token deltas, finals and logprobs as
outputs, admissions and failures in-band), and a Generate call's messages merged while unsent."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from engine_core.scheduler_output import TokenLogprobs
from services.gen.pagedserve.v1 import scheduler_pb2 as pb
from services.scheduler.sinks import CallFailed, CallSink, SampleDelta, StreamSink


@dataclass(eq=False)
class _Call:
    key: int
    remaining: int = 1


def _final(index: int, reason=pb.FINISH_REASON_LENGTH) -> pb.GenerateResponse:
    return pb.GenerateResponse(index=index, finish_reason=reason, usage=pb.Usage(completion_tokens=3))


def test_stream_sink_one_message_per_step():
    async def main():
        done: list[_Call] = []
        finals: list[pb.GenerateResponse] = []
        sink = StreamSink(done.append, lambda call, msg: finals.append(msg))
        a, b, c, d = _Call(1), _Call(2, remaining=2), _Call(3), _Call(4)
        sink.admitted(a, None)
        sink.admitted(d, CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))
        lp = TokenLogprobs(token_id=9, logprob=-0.5, rank=1, top_token_ids=[9], top_logprobs=[-0.5])
        sink.deliver([SampleDelta(a, 0, [5], None), SampleDelta(b, 0, [6, 7], None), SampleDelta(b, 1, [9], [lp]),
                      SampleDelta(c, 0, [8], None, _final(0))])
        m = await sink.next_message()
        assert list(m.accepted) == [1] and [(e.key, e.code, e.message) for e in m.errors] == [
            (4, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "queue full")]
        assert (list(m.keys), list(m.indices), list(m.num_tokens), list(m.token_ids)) == ([1, 2], [0, 0], [1, 2],
                                                                                          [5, 6, 7])
        assert [(o.key, o.response.index, list(o.response.token_ids)) for o in m.outputs] == [(2, 1, [9]), (3, 0, [8])]
        assert m.outputs[0].response.logprobs[0].logprob == -0.5
        assert m.outputs[1].response.finish_reason == pb.FINISH_REASON_LENGTH and finals[0].usage.completion_tokens == 3
        assert done == [d, c]  # rejected, then finished
        # two steps delivered before the writer runs again: one message, in step order
        sink.deliver([SampleDelta(a, 0, [1], None)])
        sink.deliver([SampleDelta(a, 0, [2], None)])
        m = await sink.next_message()
        assert list(m.token_ids) == [1, 2] and list(m.keys) == [1, 1] and sink.messages_sent == 2

    asyncio.run(main())


def test_call_sink_merges_unsent_messages():
    async def main():
        sink = CallSink(asyncio.get_running_loop())
        call = _Call(0)
        sink.deliver([SampleDelta(call, 0, [1], None), SampleDelta(call, 1, [7], None)])
        sink.deliver([SampleDelta(call, 0, [2], None)])
        sink.deliver([SampleDelta(call, 0, [3], None, _final(0))])
        first = await sink.next()
        assert (first.index, list(first.token_ids), first.finish_reason) == (0, [1, 2, 3], pb.FINISH_REASON_LENGTH)
        assert first.usage.completion_tokens == 3
        sink.deliver([SampleDelta(call, 1, [8], None)])  # index 1's message is still unsent: merged
        second = await sink.next()
        assert (second.index, list(second.token_ids)) == (1, [7, 8])
        sink.deliver([SampleDelta(call, 1, [9], None, _final(1, pb.FINISH_REASON_STOP))])  # sent: a new message
        third = await sink.next()
        assert (list(third.token_ids), third.finish_reason) == ([9], pb.FINISH_REASON_STOP)
        assert sink.queue.empty()

    asyncio.run(main())
