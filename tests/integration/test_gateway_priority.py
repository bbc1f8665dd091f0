"""Priorities and timeouts end to end through the gateway: the real scheduler service
(--scheduling-policy priority, 2 sequence slots, the model-free FakeExecutor at 20 ms a step), the
real tokenizer service and the gateway, in process. The openai SDK sends `priority` / `timeout` in
extra_body. A high-priority request sent into the saturated scheduler gets its first token before
the queued low-priority ones; a timed-out request is a 504 (request_timeout, not retried), or, when
streaming, its tokens, a last chunk with finish_reason "abort" and an in-band error event."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from engine_core.config import EngineConfig
from gateway.config import GatewayConfig
from services.scheduler.server import GuardedExecutor, SchedulerService
from tests.integration.fake_executor import FakeExecutor
from tests.integration.gateway_cases import API_KEY
from tests.integration.gateway_stack import InProcessStack, wait_until

pytestmark = pytest.mark.timeout(120)
MODEL = "fake"
STEP_S = 0.02


class Env:
    def __init__(self, tok) -> None:
        self.stack = InProcessStack()
        try:
            cfg = EngineConfig(scheduling_policy="priority", max_num_seqs=2, max_model_len=512,
                               num_gpu_blocks_override=64, max_num_batched_tokens=2048)

            async def start():
                svc = SchedulerService(cfg, lambda c: GuardedExecutor(FakeExecutor(c, step_delay_s=STEP_S)),
                                       port=0, max_queue_len=64, grace_s=0.2)
                await svc.start()
                return svc

            self.svc = self.stack.lt.run(start())
            assert wait_until(lambda: self.svc.engine.info is not None, 20)
            tok_addr = self.stack.start_tokenizer(tok, 512)
            self.url = self.stack.start_gateway(GatewayConfig(
                scheduler_address=self.svc.address, tokenizer_address=tok_addr, api_key=API_KEY))
        except BaseException:
            self.close()
            raise
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0)

    @property
    def engine(self):
        return self.svc.engine

    def close(self) -> None:
        svc = getattr(self, "svc", None)
        if svc is not None:
            self.stack.lt.run(svc.stop(0.2))
        self.stack.close()


@pytest.fixture(scope="module")
def env(smol_tokenizer):
    e = Env(smol_tokenizer)
    yield e
    e.close()


class SDKStream(threading.Thread):
    """One streaming completion through the openai SDK; notes when its first chunk came."""

    def __init__(self, env: Env, max_tokens: int, priority: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.env, self.max_tokens, self.priority, self.seed = env, max_tokens, priority, seed
        self.first_at: float | None = None
        self.finish: str | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            stream = self.env.client.completions.create(
                model=MODEL, prompt=[self.seed, 2, 3], max_tokens=self.max_tokens, stream=True,
                extra_body={"priority": self.priority, "ignore_eos": True})
            for chunk in stream:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
        except Exception as e:  # noqa: BLE001 (asserted by the test)
            self.error = e


def test_high_priority_first_token_before_queued_low_ones(env):
    running = [SDKStream(env, 60, 5, 10 + i) for i in range(2)]
    assert wait_until(lambda: all(r.first_at for r in running), 20)
    queued = [SDKStream(env, 4, 5, 20 + i) for i in range(3)]
    assert wait_until(lambda: env.engine.num_waiting == 3, 20)
    preemptions = env.engine.last_stats.num_preemptions
    high = SDKStream(env, 4, 0, 30)
    for t in [*running, *queued, high]:
        t.join(60)
    assert all(t.error is None and t.finish == "length" for t in [*running, *queued, high]), \
        [(t.error, t.finish) for t in [*running, *queued, high]]
    assert all(high.first_at < q.first_at for q in queued)
    assert wait_until(lambda: env.engine.last_stats.num_preemptions > preemptions, 5)  # a low one made room


def test_timeout_non_streaming_is_a_504_not_retried(env):
    r = httpx.post(env.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                   json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "timeout": 0.3})
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
    assert "timed out" in err["message"] and "timeout 0.3s" in err["message"]
    assert r.headers["x-should-retry"] == "false"
    with pytest.raises(openai.APIStatusError) as e:  # default retries on: x-should-retry stops them
        openai.OpenAI(base_url=env.url + "/v1", api_key=API_KEY).completions.create(
            model=MODEL, prompt=[1, 2, 3], max_tokens=400, extra_body={"timeout": 0.2, "ignore_eos": True})
    assert e.value.status_code == 504 and "timed out" in e.value.message
    assert wait_until(lambda: env.engine.num_running == env.engine.num_waiting == 0, 5)
    assert env.engine.core.counters.requests_timed_out >= 2
    assert wait_until(lambda: env.engine.last_stats.finished_by_reason["abort"] >= 2, 5)  # consistent counts


def test_timeout_streaming_keeps_tokens_then_abort_chunk_and_error_event(env):
    events = []
    with httpx.stream("POST", env.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30, json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True,
                                        "timeout": 0.4, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == "request_timeout" and "timed out" in err["message"]
    last = events[-3]["choices"][0]
    assert last["finish_reason"] == "abort"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text  # the tokens generated before the deadline were streamed
    with pytest.raises(openai.APIError, match="timed out"):
        for _ in env.client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=400, stream=True,
                                               extra_body={"timeout": 0.2, "ignore_eos": True}):
            pass


def test_priority_accepted_and_bad_values_refused(env):
    ok = env.client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, extra_body={"priority": -4})
    assert ok.choices[0].finish_reason in ("length", "stop")
    for body, param in (({"priority": "1"}, "priority"), ({"timeout": -2}, "timeout")):
        r = httpx.post(env.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                       json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
