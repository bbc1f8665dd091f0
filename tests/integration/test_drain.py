"""Issue 16, finding 3: SIGTERM no longer cuts streams silently. The gateway process (against the
real tokenizer service and the fake scheduler, in-process here) drains: new requests get 503 +
Retry-After, a stream that ends within --shutdown-grace ends normally, the ones still running at
the end of the grace get an in-band error chunk and `data: [DONE]`, and the process exits."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.integration.fake_scheduler import FakeScheduler
from tests.integration.gateway_stack import InProcessStack, Proc

pytestmark = pytest.mark.timeout(120)
GRACE_S = 3.0


@pytest.fixture(scope="module")
def backends(smol_tokenizer):
    st = InProcessStack()
    fake = FakeScheduler.for_tokenizer(smol_tokenizer, max_model_len=4096, token_delay_s=0.02)
    yield st.start_scheduler(fake), st.start_tokenizer(smol_tokenizer, 4096), fake
    st.close()


def _stream(url: str, max_tokens: int, out: list) -> None:
    """One streaming completion; appends (data lines, error) to out."""
    lines: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                "ignore_eos": True}) as r:
            lines.append(f"status {r.status_code}")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
        out.append((lines, None))
    except httpx.HTTPError as e:
        out.append((lines, e))


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_streams_and_ends_each_with_done(backends, workers):
    sched, tok, fake = backends
    gw = Proc(["-m", "gateway", "--port", "0", "--scheduler-address", sched, "--tokenizer-address", tok,
               "--shutdown-grace", str(GRACE_S), "--workers", str(workers)], "gateway", timeout=60)
    url = f"http://{gw.address}"
    try:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        results: list = []
        # 8 long streams (20 ms/token x 2000 tokens: far past the grace) + 1 that ends within it.
        threads = [threading.Thread(target=_stream, args=(url, 2000, results)) for _ in range(8)]
        short: list = []
        threads.append(threading.Thread(target=_stream, args=(url, 40, short)))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while sum(fake.running.values()) < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(fake.running.values()) == 9
        t0 = time.monotonic()
        gw.p.send_signal(15)
        time.sleep(1.0)  # uvicorn's worker supervisor checks for a stop every 0.5 s before signalling workers
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        for t in threads:
            t.join(30)
        rc = gw.p.wait(15)
        elapsed = time.monotonic() - t0
    finally:
        gw.stop()
    assert rc in (0, -15), gw.output()
    assert GRACE_S - 0.5 < elapsed < GRACE_S + 6, elapsed
    # the short stream finished normally
    (lines, err), = short
    assert err is None and lines[0] == "status 200" and lines[-1] == "[DONE]"
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    # the 8 long ones: tokens, then one in-band error, then [DONE]
    assert len(results) == 8
    for lines, err in results:
        assert err is None, (err, lines[-3:])
        assert lines[0] == "status 200" and lines[-1] == "[DONE]", lines[-3:]
        last = json.loads(lines[-2])
        assert last["error"]["code"] == "service_unavailable" and "shutting down" in last["error"]["message"]
        assert len(lines) > 5  # it was streaming tokens before
    print(f"drain ({workers} workers): SIGTERM -> exit {elapsed:.2f}s (grace {GRACE_S}s); 8 streams ended in-band + [DONE], "
          "1 finished normally, new request 503 + Retry-After")
    # every request was ended in the scheduler (aborted on close)
    deadline = time.monotonic() + 5
    while fake.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fake.running


def test_sigterm_idle_gateway_exits_at_once(backends):
    sched, tok, _ = backends
    gw = Proc(["-m", "gateway", "--port", "0", "--scheduler-address", sched, "--tokenizer-address", tok,
               "--shutdown-grace", "30"], "gateway", timeout=60)
    try:
        t0 = time.monotonic()
        gw.p.send_signal(15)
        gw.p.wait(15)
        assert time.monotonic() - t0 < 5  # nothing in flight: no need to wait for the grace
    finally:
        gw.stop()
