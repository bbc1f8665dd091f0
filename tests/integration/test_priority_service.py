"""Priorities and timeouts through the scheduler gRPC service (FakeExecutor: no model, a fixed step
time): a high-priority request sent into a saturated scheduler gets its first token before the
queued low-priority ones; a timeout ends the stream with FINISH_REASON_ABORT + error_message; bad
priority / timeout_s are INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import math
import threading
import time

import grpc
import pytest

from services.gen.pagedserve.v1 import scheduler_pb2 as pb
from tests.integration.test_scheduler_service import Scheduler
from tests.integration.test_scheduler_service import gen_req as _gen_req

pytestmark = pytest.mark.timeout(60)


def gen_req(rid: str, prompt=(1, 2, 3), *, priority: int = 0, timeout_s: float | None = None,
            **sp) -> pb.GenerateRequest:
    req = _gen_req(rid, prompt, **sp)
    req.priority = priority
    if timeout_s is not None:
        req.timeout_s = timeout_s
    return req


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


class Stream(threading.Thread):
    """Consumes one Generate call, noting when its first token arrived and its final message."""

    def __init__(self, stub, req: pb.GenerateRequest) -> None:
        super().__init__(daemon=True)
        self.stub, self.req = stub, req
        self.first_token_at: float | None = None
        self.tokens: list[int] = []
        self.final: pb.GenerateResponse | None = None
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        try:
            for msg in self.stub.Generate(self.req, timeout=30):
                if msg.token_ids and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.tokens.extend(msg.token_ids)
                if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    self.final = msg
        except grpc.RpcError as e:
            self.error = e


def test_high_priority_first_token_before_queued_low_ones():
    s = Scheduler(scheduling_policy="priority", max_num_seqs=2)
    try:
        running = [Stream(s.stub, gen_req(f"run{i}", [10 + i, 2, 3], max_tokens=60, priority=5)) for i in range(2)]
        wait_for(lambda: all(r.first_token_at for r in running))
        queued = [Stream(s.stub, gen_req(f"queued{i}", [20 + i, 2, 3], max_tokens=5, priority=5)) for i in range(3)]
        wait_for(lambda: s.stats().num_waiting == 3)
        high = Stream(s.stub, gen_req("high", [30, 2, 3], max_tokens=5, priority=0))
        for t in [*running, *queued, high]:
            t.join(20)
        assert all(t.final is not None and t.error is None for t in [*running, *queued, high])
        assert all(high.first_token_at < q.first_token_at for q in queued)
        assert high.final.finish_reason == pb.FINISH_REASON_LENGTH and len(high.tokens) == 5
        # run1 (the lowest priority, latest arrival) made room, and still finished all its tokens.
        assert s.stats().num_preemptions >= 1
        assert running[1].final.metrics.num_preemptions == 1 and len(running[1].tokens) == 60
    finally:
        s.close()


def test_timeout_ends_the_stream_with_abort_and_a_message():
    s = Scheduler()
    try:
        t = Stream(s.stub, gen_req("slow", max_tokens=400, timeout_s=0.3))  # 10 ms a step: ~4 s uncut
        ok = Stream(s.stub, gen_req("fine", max_tokens=5, timeout_s=30))
        t.join(10)
        ok.join(10)
        assert t.error is None and t.final is not None
        assert t.final.finish_reason == pb.FINISH_REASON_ABORT
        assert "timed out" in t.final.error_message and "timeout 0.3s" in t.final.error_message
        assert 0 < len(t.tokens) < 400 and t.final.usage.completion_tokens == len(t.tokens)
        assert ok.final.finish_reason == pb.FINISH_REASON_LENGTH and not ok.final.error_message
        st = s.stats()
        assert st.finished_by_reason["abort"] == 1 and st.num_running == st.num_waiting == 0
        assert s.svc.engine.core.counters.requests_timed_out == 1
        assert st.num_free_blocks == st.num_kv_blocks  # freed at once
    finally:
        s.close()


def test_server_default_timeout():
    s = Scheduler(request_timeout=0.2)
    try:
        t = Stream(s.stub, gen_req("slow", max_tokens=400))
        off = Stream(s.stub, gen_req("off", max_tokens=40, timeout_s=0))  # 0: no timeout for this one
        t.join(10)
        off.join(10)
        assert t.final.finish_reason == pb.FINISH_REASON_ABORT and "timeout 0.2s" in t.final.error_message
        assert off.final.finish_reason == pb.FINISH_REASON_LENGTH and len(off.tokens) == 40
    finally:
        s.close()


@pytest.mark.parametrize("kw,field", [({"priority": 1}, "priority"), ({"priority": -1}, "priority"),
                                      ({"timeout_s": -1.0}, "timeout_s"), ({"timeout_s": math.nan}, "timeout_s"),
                                      ({"timeout_s": math.inf}, "timeout_s")])
def test_bad_scheduling_fields_are_invalid_argument(kw, field):
    s = Scheduler()  # fcfs
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(s.stub.Generate(gen_req("bad", **kw), timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field)
    finally:
        s.close()
