"""Issue 16, findings 6 and 7 at the gateway (real tokenizer service, fake scheduler): the `method`
label of the HTTP metrics stays bounded under junk methods, non-finite sampling numbers are 400s,
client aborts are all counted, /metrics can be put behind the API key and /dashboard always is,
and the 429 message says "retry later" once."""
from __future__ import annotations

import re
import socket

import grpc
import httpx
import pytest

from gateway.backend import status_to_api
from gateway.config import GatewayConfig
from tests.integration.fake_scheduler import FakeScheduler
from tests.integration.gateway_stack import InProcessStack, wait_until

pytestmark = pytest.mark.timeout(120)
KEY = "sk-hardening"
# Methods the HTTP parser accepts (WebDAV, RTSP, ...) that no route of ours knows.
JUNK_METHODS = ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PURGE", "SEARCH", "REPORT", "MERGE",
                "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "CHECKOUT", "MKACTIVITY", "ACL", "BIND", "LINK")


@pytest.fixture(scope="module")
def stack(smol_tokenizer):
    st = InProcessStack()
    fake = FakeScheduler.for_tokenizer(smol_tokenizer, max_model_len=1024, token_delay_s=0.01)
    sched, tok_addr = st.start_scheduler(fake), st.start_tokenizer(smol_tokenizer, 1024)
    open_url = st.start_gateway(GatewayConfig(scheduler_address=sched, tokenizer_address=tok_addr))
    keyed_url = st.start_gateway(GatewayConfig(scheduler_address=sched, tokenizer_address=tok_addr, api_key=KEY,
                                               metrics_auth=True))
    yield open_url, keyed_url, fake
    st.close()


def _raw_request(url: str, method: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"{method} /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass


def _series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_junk_methods_do_not_grow_metric_series(stack):
    url = stack[0]
    for method in JUNK_METHODS:
        _raw_request(url, method)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    methods = {re.search(r'method="([^"]*)"', line).group(1)
               for line in _series(text, "pagedserve:http_requests_total")}
    assert not methods & set(JUNK_METHODS), methods
    assert "other" in methods


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "temperature": Infinity}',
                                 b'{"prompt": "x", "temperature": 1e308}', b'{"prompt": "x", "top_p": -Infinity}'])
def test_non_finite_sampling_numbers_are_400(stack, raw):
    r = httpx.post(f"{stack[0]}/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("temperature", "top_p")


def test_every_client_abort_is_counted(stack):
    url, _, fake = stack

    def disconnects() -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in _series(text, "pagedserve:client_disconnects_total")
                   if 'endpoint="/v1/completions"' in line)

    before = disconnects()
    for _ in range(10):  # streams dropped after the first chunk
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": "x", "max_tokens": 500, "stream": True}) as r:
            next(r.iter_lines())
    for _ in range(5):  # plain requests abandoned before the answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 500}, timeout=0.3)
    assert wait_until(lambda: disconnects() - before == 15, 10), disconnects() - before
    assert wait_until(lambda: not fake.running, 10)


def test_metrics_and_dashboard_behind_the_key(stack):
    _, url, _ = stack
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    r = httpx.get(f"{url}/dashboard", timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{url}/dashboard", auth=("any", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{url}/dashboard", auth=("any", KEY), timeout=10).status_code == 200
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes stay open
    assert httpx.get(f"{stack[0]}/metrics", timeout=10).status_code == 200  # without --metrics-auth: open


def test_429_says_retry_later_once():
    err = status_to_api(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "the scheduler's waiting queue is full (4 requests); retry later", "scheduler")
    assert err.status == 429 and err.message.count("retry later") == 1, err.message


def test_scheduler_rejects_never_admissible_n(tmp_path):
    """Finding 5 at the scheduler: n beyond --max-queue-len + --max-num-seqs is INVALID_ARGUMENT."""

    from engine_core.config import EngineConfig
    from services.gen.pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
    from services.scheduler.server import GuardedExecutor, SchedulerService
    from tests.integration.fake_executor import FakeExecutor
    from tests.integration.loop_thread import LoopThread

    lt = LoopThread(name="sched-n", default_timeout=30)

    async def go():
        svc = SchedulerService(EngineConfig(max_num_seqs=4, max_model_len=256),
                               lambda c: GuardedExecutor(FakeExecutor(c)), port=0, max_queue_len=8)
        await svc.start()
        codes = []
        async with grpc.aio.insecure_channel(svc.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            for n in (13, 12):
                try:
                    async for _ in stub.Generate(scheduler_pb2.GenerateRequest(
                            request_id=f"r{n}", prompt_token_ids=[1, 2],
                            sampling_params=common_pb2.SamplingParams(n=n, max_tokens=1)), timeout=20):
                        pass
                    codes.append("OK")
                except grpc.aio.AioRpcError as e:
                    codes.append((e.code().name, e.details()))
        await svc.stop(0)
        return codes

    try:
        codes = lt.run(go())
    finally:
        lt.close()
    assert codes[0][0] == "INVALID_ARGUMENT" and "can ever hold" in codes[0][1], codes
    assert codes[1] == "OK", codes


def test_one_eos_set_across_the_stack(stack):
    """The tokenizer's end-of-generation tokens (SmolLM2: <|im_end|> 2 and <|endoftext|> 0) and the
    model's (2 only) differed; the gateway now stops on the tokenizer's extra ones too."""
    url, _, fake = stack
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "stop_token_ids": [5]}, timeout=10)
    assert r.status_code == 200
    assert list(fake.requests[-1].sampling_params.stop_token_ids) == [5, 0]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True}, timeout=10)
    assert r.status_code == 200 and list(fake.requests[-1].sampling_params.stop_token_ids) == []
