"""The gateway over two fake scheduler replicas (in-process grpc.aio, real tokenizer service):
routing spreads requests, a replica that dies moves its requests that have no token yet to the other
one (every such request succeeds), a streaming request that already had tokens ends with a clear
in-band error, /health and the replica metrics follow, and the replica rejoins once it is back on
its address. Fast: no model."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re

import httpx
import pytest

from gateway.config import GatewayConfig
from services.gen.pagedserve.v1 import scheduler_pb2_grpc
from services.grpc_server import AioGrpcServer
from tests.integration.fake_scheduler import SCRIPT_TEXT, FakeScheduler
from tests.integration.gateway_stack import (
    SCHEDULER_SERVICE,
    InProcessStack,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

MAX_LEN = 256


@pytest.fixture(scope="module")
def tok(gguf_path):
    from engine_core.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


class Replicas:
    def __init__(self, tok) -> None:
        self.tok = tok
        self.script = tok.encode(SCRIPT_TEXT, add_special_tokens=False)
        self.stack = InProcessStack()
        self.tok_addr = self.stack.start_tokenizer(tok, MAX_LEN)
        self.servers: dict[str, AioGrpcServer] = {}
        self.fakes: dict[str, FakeScheduler] = {}

    def fake(self, **kw) -> FakeScheduler:
        return FakeScheduler(self.script, vocab_size=self.tok.vocab_size, eos_token_id=self.tok.eos_token_ids[0],
                             max_model_len=MAX_LEN, model_name="fake-model", **kw)

    def start(self, fake: FakeScheduler, port: int = 0) -> str:
        async def go():
            srv = AioGrpcServer("scheduler", [SCHEDULER_SERVICE], "127.0.0.1", port, grace_s=0.1)
            scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, srv.server)
            await srv.start()
            await srv.set_serving(True)
            return srv

        srv = self.stack.lt.run(go())
        self.servers[srv.address], self.fakes[srv.address] = srv, fake
        return srv.address

    def kill(self, address: str) -> None:
        srv = self.servers.pop(address)

        async def stop():
            await srv.stop(0)

        self.stack.lt.run(stop())

    def gateway(self, addresses: list[str], routing: str) -> httpx.Client:
        url = self.stack.start_gateway(GatewayConfig(scheduler_address=",".join(addresses),
                                                     tokenizer_address=self.tok_addr, routing=routing,
                                                     replica_stats_interval_s=0.1))
        return httpx.Client(base_url=url, timeout=30)

    def close(self) -> None:
        for address in list(self.servers):
            self.kill(address)
        self.stack.close()


@pytest.fixture()
def env(tok):
    e = Replicas(tok)
    yield e
    e.close()


def metric(http: httpx.Client, name: str, replica: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        m = re.match(rf'pagedserve:{name}\{{(.*)\}} (\S+)$', line)
        if m and f'replica="{replica}"' in m.group(1):
            total += float(m.group(2))
    return total


def test_failed_replica_moves_requests_without_tokens_and_rejoins(env):
    fast = env.start(env.fake())
    slow_fake = env.fake(first_token_delay_s=60)  # its requests never get a token before it dies
    slow = env.start(slow_fake)
    port = int(slow.rsplit(":", 1)[1])
    http = env.gateway([fast, slow], "round-robin")
    assert http.get("/health").json()["checks"]["replicas"] == {fast: "ok", slow: "ok"}
    body = {"model": "fake-model", "prompt": "Hello there", "max_tokens": 4}
    moved_before = metric(http, "replica_retries_total", slow)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(http.post, "/v1/completions", json=body) for _ in range(8)]
        assert wait_until(lambda: len(slow_fake.running) == 4, timeout=10), slow_fake.running
        env.kill(slow)  # mid-load: 4 requests admitted there, none with a token
        answers = [f.result() for f in futs]
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in answers)
    assert metric(http, "replica_retries_total", slow) - moved_before == 4
    assert wait_until(lambda: metric(http, "replica_healthy", slow) == 0, timeout=5)
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["checks"]["replicas"][slow].startswith("unreachable")
    # while it is down everything goes to the other replica
    routed = metric(http, "replica_requests_total", fast)
    assert all(http.post("/v1/completions", json=body).status_code == 200 for _ in range(4))
    assert metric(http, "replica_requests_total", fast) - routed == 4
    # back on its address: it rejoins the rotation
    back = env.fake()
    env.start(back, port)
    assert wait_until(lambda: metric(http, "replica_healthy", slow) == 1, timeout=15)
    assert all(http.post("/v1/completions", json=body).status_code == 200 for _ in range(4))
    assert len(back.finished) == 2  # round-robin: half of them


def test_replica_dying_after_tokens_ends_the_stream_with_a_clear_error(env):
    fake = env.fake(token_delay_s=0.2)
    addr = env.start(fake)
    other = env.start(env.fake())
    http = env.gateway([addr, other], "round-robin")
    chunks: list[str] = []
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 100, "stream": True}
    killed = False
    for _ in range(2):  # round-robin: one of the two requests lands on `addr`
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[6:])
                if not killed and fake.running and len(chunks) >= 2:
                    env.kill(addr)
                    killed = True
        if killed:
            break
    assert killed and chunks[-1] == "[DONE]"
    err = json.loads(chunks[-2])["error"]
    assert err["code"] == "service_unavailable" and "produced tokens" in err["message"], err
    assert addr in err["message"]


def test_greedy_stream_resumes_on_another_replica_by_replay(env):
    dying = env.fake(token_delay_s=0.2)
    addr = env.start(dying)
    survivor = env.fake()
    other = env.start(survivor)
    http = env.gateway([addr, other], "round-robin")
    body = {"model": "fake-model", "prompt": "Hi there", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    killed = False
    for _ in range(2):  # round-robin: one of the two requests lands on `addr`
        texts, usage, errors = [], None, []
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"])
                usage = chunk.get("usage") or usage
                texts += [c["text"] for c in chunk.get("choices", []) if c["text"]]
                if not killed and dying.running and len(texts) >= 3:
                    env.kill(addr)
                    killed = True
        if killed:
            break
    assert killed and not errors, errors
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] == len(dying.requests[-1].prompt_token_ids)
    (resumed,) = [q for q in survivor.requests if q.request_id == dying.requests[-1].request_id]
    produced = len(resumed.prompt_token_ids) - usage["prompt_tokens"]
    assert produced >= 3 and resumed.sampling_params.max_tokens == 12 - produced
    assert list(resumed.prompt_token_ids[:usage["prompt_tokens"]]) == list(dying.requests[-1].prompt_token_ids)
    assert "".join(texts).startswith(env.tok.decode(resumed.prompt_token_ids[usage["prompt_tokens"]:]))


def test_dashboard_stream_shows_every_replica(env):
    a, b = env.start(env.fake()), env.start(env.fake())
    http = env.gateway([a, b], "least-load")
    with http.stream("GET", "/dashboard/stream") as r:
        snap = None
        for line in r.iter_lines():
            if line.startswith("data: "):
                snap = json.loads(line[6:])
                if "replicas" in snap:
                    break
    assert snap["replica"] in (a, b)
    reps = {x["address"]: x for x in snap["replicas"]}
    assert set(reps) == {a, b}
    for x in reps.values():
        assert x["healthy"] is True and x["num_kv_blocks"] == 64 and x["in_flight"] == 0
        assert "blocks" in x and "requests" in x and "latency" not in x


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (make setup)")
def test_dashboard_draws_a_block_map_per_replica_in_headless_chromium(env):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup)")
    a, b = env.start(env.fake()), env.start(env.fake())
    http = env.gateway([a, b], "least-load")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(str(http.base_url) + "/dashboard", wait_until="load")
            page.wait_for_function("() => document.querySelectorAll('#replica-list .replica canvas').length == 2"
                                   " && !document.getElementById('replicas').hidden", timeout=20_000, polling=100)
            titles = page.eval_on_selector_all("#replica-list .replica-title", "els => els.map(e => e.textContent)")
            assert sorted(t.split(" ", 1)[1] for t in titles) == sorted([a, b])
            drawn = page.evaluate("""() => [...document.querySelectorAll('#replica-list canvas')].map(c => {
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                return n; })""")
            assert all(n > 0 for n in drawn), drawn  # each replica's 64 free blocks are drawn
        finally:
            browser.close()
    assert not errors, errors
