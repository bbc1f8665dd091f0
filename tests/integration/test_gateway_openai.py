"""Acceptance for the gateway (issue 5): the official `openai` package, sync and async, against the
real stack — executor, scheduler, tokenizer and gateway as processes on 127.0.0.1, the embedded
SmolLM2 on CPU. Greedy text equals the in-process engine's; streaming, n=2, stop, logprobs, seeds,
include_usage; the bad-request table; 64 concurrent streams with 32 closed early leave zero KV
blocks in use; a non-streaming client that leaves frees its request too; 429 from a full queue and
503 with the scheduler gone (a second, model-free scheduler); the README's curl example."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.gen.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.gateway_cases import (
    API_KEY,
    BAD_REQUESTS,
    MAX_BODY_BYTES,
    check_error,
    send,
)
from tests.integration.gateway_stack import Proc, wait_until

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 512
N = 8  # new tokens per request: the machine has 2 cores, shared
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("services.scheduler.server") is None,
                       reason="the scheduler service is not there yet"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colors."}]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class Stack:
    def __init__(self) -> None:
        self.procs: list[Proc] = []
        try:
            self.executor = self._start(["-m", "services.executor", "--port", "0", "--device", "cpu",
                                         "--max-model-len", str(MAX_LEN), "--kv-cache-memory-gb", "0.25"], "executor")
            self.tokenizer = self._start(["-m", "services.tokenizer", "--port", "0",
                                          "--max-model-len", str(MAX_LEN)], "tokenizer")
            self.scheduler = self._start(["-m", "services.scheduler", "--port", "0",
                                          "--executor-address", self.executor.address], "scheduler")
            self.gateway = self._start(["-m", "gateway", "--port", "0", "--scheduler-address", self.scheduler.address,
                                        "--tokenizer-address", self.tokenizer.address, "--api-key", API_KEY,
                                        "--max-body-bytes", str(MAX_BODY_BYTES)], "gateway")
        except BaseException:
            self.close()
            raise
        self.url = f"http://{self.gateway.address}"
        self.sched_channel = grpc.insecure_channel(self.scheduler.address)
        self.sched = scheduler_pb2_grpc.SchedulerStub(self.sched_channel)

    def _start(self, args: list[str], name: str, env: dict | None = None) -> Proc:
        p = Proc(args, name, env=env)
        self.procs.append(p)
        return p

    def wait_ready(self, timeout: float = 180) -> None:
        if not wait_until(lambda: healthy(self.url) or not all(p.alive() for p in self.procs), timeout, 0.25) \
                or not healthy(self.url):
            raise RuntimeError("stack not healthy:\n" + "\n".join(f"--- {p.name}\n{p.output()}" for p in self.procs))
        self.model = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()[
            "data"][0]["id"]

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return self.sched.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)

    def idle(self) -> bool:
        s = self.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def close(self) -> None:
        if getattr(self, "sched_channel", None) is not None:
            self.sched_channel.close()
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    try:
        s.wait_ready()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def llm(stack):
    from engine_core.llm import LLM

    return LLM(max_model_len=MAX_LEN, device="cpu", kv_cache_memory_gb=0.1)


@pytest.fixture(scope="module")
def greedy(llm):
    """In-process greedy outputs: {prompt: CompletionOutput} (N tokens) and the chat answer."""
    from engine_core.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=N)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    chat = llm.chat(CHAT, sp, use_tqdm=False)[0].outputs[0]
    return {p: o.outputs[0] for p, o in zip(PROMPTS, outs)}, chat


# ---------------------------------------------------------------------------- the SDK
def test_models_list(stack):
    ids = [m.id for m in stack.client().models.list().data]
    assert ids == [stack.model]

    async def main():
        async with stack.async_client() as c:
            return [m.id for m in (await c.models.list()).data]

    assert asyncio.run(main()) == ids


def test_greedy_completions_equal_engine(stack, greedy):
    outs, _ = greedy
    r = stack.client().completions.create(model=stack.model, prompt=PROMPTS, max_tokens=N, temperature=0)
    assert [c.text for c in r.choices] == [outs[p].text for p in PROMPTS]
    assert [c.finish_reason for c in r.choices] == [outs[p].finish_reason for p in PROMPTS]
    assert r.usage.completion_tokens == sum(len(outs[p].token_ids) for p in PROMPTS)
    assert r.usage.prompt_tokens == sum(len(stack_tokens(stack, p)) for p in PROMPTS)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def stack_tokens(stack, text: str) -> list[int]:
    from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    with grpc.insecure_channel(stack.tokenizer.address) as ch:
        return list(tokenizer_pb2_grpc.TokenizerStub(ch).Encode(tokenizer_pb2.EncodeRequest(text=text)).token_ids)


def test_greedy_chat_equal_engine_sync_async_stream(stack, greedy):
    _, want = greedy
    client = stack.client()
    r = client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])

    async def main():
        async with stack.async_client() as c:
            full = await c.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=N, temperature=0)
            stream = await c.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=N,
                                                     temperature=0, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return full.choices[0].message.content, text

    assert asyncio.run(main()) == (want.text, want.text)


def test_stream_completions_include_usage(stack, greedy):
    outs, _ = greedy
    p = PROMPTS[1]

    async def main():
        async with stack.async_client() as c:
            stream = await c.completions.create(model=stack.model, prompt=p, max_tokens=N, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
            return [ch async for ch in stream]

    chunks = asyncio.run(main())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == outs[p].text
    assert chunks[-1].usage.completion_tokens == len(outs[p].token_ids)
    assert chunks[-1].usage.prompt_tokens == len(stack_tokens(stack, p))


def test_n2_and_seed_reproducible(stack):
    client = stack.client()
    kw = {"model": stack.model, "messages": CHAT, "max_tokens": 4, "temperature": 1.0, "n": 2, "seed": 1234}
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 8
    texts = [client.completions.create(model=stack.model, prompt=PROMPTS[2], max_tokens=6, temperature=1.0,
                                       seed=s).choices[0].text for s in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    assert len(set(texts)) >= 2  # other seeds, other samples
    stream = client.completions.create(model=stack.model, prompt=PROMPTS[0], max_tokens=3, n=2, temperature=0,
                                       stream=True)
    by_index = {0: "", 1: ""}
    for ch in stream:
        for c in ch.choices:
            by_index[c.index] += c.text
    assert by_index[0] == by_index[1] and by_index[0]  # greedy samples agree


def test_n_best_of_and_beam_search_equal_engine(stack, llm):
    """n>1 / best_of / beam search run on forked block tables in the scheduler service: the stack
    gives the in-process engine's tokens (seeded samples, ranked best_of, beams best first)."""
    from engine_core.beam_search import BeamSearchParams
    from engine_core.sampling_params import SamplingParams

    client, p = stack.client(), PROMPTS[0]
    kw = {"max_tokens": N, "temperature": 1.0, "seed": 99}
    r = client.completions.create(model=stack.model, prompt=p, n=3, extra_body={"ignore_eos": True}, **kw)
    want = llm.generate([p], SamplingParams(n=3, ignore_eos=True, **kw), use_tqdm=False)[0].outputs
    assert [c.text for c in r.choices] == [o.text for o in want]
    r = client.completions.create(model=stack.model, prompt=p, n=2, best_of=4, extra_body={"ignore_eos": True}, **kw)
    want = llm.generate([p], SamplingParams(n=2, best_of=4, ignore_eos=True, **kw), use_tqdm=False)[0].outputs
    assert [c.text for c in r.choices] == [o.text for o in want] and len(r.choices) == 2
    r = client.completions.create(model=stack.model, prompt=p, n=3, max_tokens=N,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.8})
    want = llm.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=N, length_penalty=0.8))[0].sequences
    assert [c.text for c in r.choices] == [s.text for s in want]
    r = client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=N,
                                       extra_body={"use_beam_search": True, "beam_width": 2})
    assert len(r.choices) == 2 and all(c.message.content for c in r.choices)
    with pytest.raises(openai.BadRequestError) as e:  # 11 beams need 22 logprobs per step (max 20)
        client.completions.create(model=stack.model, prompt=p, n=11, max_tokens=2, extra_body={"use_beam_search": True})
    assert "beam_width" in str(e.value)
    assert wait_until(stack.idle, 10)


def test_stop_strings(stack, greedy):
    outs, _ = greedy
    p = PROMPTS[2]
    full = outs[p].text
    words = full.split()
    stop = words[len(words) // 2]
    want = full[: full.index(stop)]
    client = stack.client()
    r = client.completions.create(model=stack.model, prompt=p, max_tokens=N, temperature=0, stop=[stop, "@@@"])
    c = r.choices[0]
    assert (c.text, c.finish_reason) == (want, "stop")
    assert r.usage.completion_tokens <= len(outs[p].token_ids)
    chunks = list(client.completions.create(model=stack.model, prompt=p, max_tokens=N, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model=stack.model, prompt=p, max_tokens=N, temperature=0, stop=stop,
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == want + stop
    assert wait_until(stack.idle, 10)


def test_logprobs(stack):
    client = stack.client()
    r = client.completions.create(model=stack.model, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 3 <= len(top) <= 4 and tok in top
        assert max(top.values()) == pytest.approx(val, abs=1e-4)  # greedy: the sampled token is the best
    r = client.chat.completions.create(model=stack.model, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)


# ---------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def raw(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c.name for c in BAD_REQUESTS])
def test_bad_requests(stack, raw, case):
    check_error(send(raw, case), case, MAX_LEN)


def test_serves_after_bad_requests(stack, greedy):
    outs, _ = greedy
    r = stack.client().completions.create(model=stack.model, prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == outs[PROMPTS[0]].text


def test_sdk_error_classes(stack):
    client = stack.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=str(MAX_LEN)):
        client.completions.create(model=stack.model, prompt="hello " * 600, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url + "/v1", api_key="wrong", max_retries=0).models.list()


# ---------------------------------------------------------------------------- concurrency, disconnects
def test_64_streams_32_closed_early_free_all_blocks(stack):
    async def main():
        async with stack.async_client(timeout=120) as c:
            async def one(i: int) -> str | None:
                stream = await c.chat.completions.create(
                    model=stack.model, max_tokens=6, temperature=0.8, seed=i, stream=True,
                    messages=[{"role": "user", "content": f"Number {i}?"}])
                finish = None
                async for chunk in stream:
                    if i % 2 and chunk.choices and chunk.choices[0].delta.content:
                        await stream.close()  # client goes away mid-stream
                        return "closed"
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                return finish

            return await asyncio.gather(*(one(i) for i in range(64)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert results[1::2] == ["closed"] * 32
    assert all(r in ("stop", "length") for r in results[0::2]), results
    assert wait_until(stack.idle, 15), stack.stats()
    assert elapsed < 120


def test_nonstream_client_gone_frees_request(stack):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"prompt": PROMPTS[2], "max_tokens": 400, "ignore_eos": True},
                   timeout=httpx.Timeout(10, read=1.0))
    assert wait_until(stack.idle, 10), stack.stats()


# ---------------------------------------------------------------------------- 429 / 503
@pytest.fixture(scope="module")
def busy_stack(stack):
    """A model-free scheduler (FakeExecutor, 50 ms steps, vocab 1000) that runs one request and
    queues one, behind its own gateway (API key from the environment variable)."""
    extra = []
    try:
        sched = Proc(["-m", "services.scheduler", "--port", "0", "--executor-address", "local",
                      "--executor", "tests.integration.fake_executor:slow_fake_executor",
                      "--max-num-seqs", "1", "--max-queue-len", "1"], "scheduler",
                     env={"FAKE_EXECUTOR_STEP_DELAY_S": "0.05"})
        extra.append(sched)
        gw = Proc(["-m", "gateway", "--port", "0", "--scheduler-address", sched.address,
                   "--tokenizer-address", stack.tokenizer.address], "gateway", env={"PAGEDSERVE_API_KEY": "env-key"})
        extra.append(gw)
        url = f"http://{gw.address}"
        assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, 60, 0.2), sched.output()
        yield sched, url
    finally:
        for p in reversed(extra):
            p.stop()


def test_queue_full_429_then_backend_down_503(busy_stack):
    sched, url = busy_stack
    headers = {"Authorization": "Bearer env-key"}
    body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()
                await lines.__anext__()
                queued = asyncio.ensure_future(c.post("/v1/completions", json=body))
                with grpc.insecure_channel(sched.address) as ch:
                    stub = scheduler_pb2_grpc.SchedulerStub(ch)
                    assert await asyncio.to_thread(wait_until, lambda: stub.GetStats(
                        scheduler_pb2.GetStatsRequest()).num_waiting == 1, 10)
                    busy = await c.post("/v1/completions", json=body)
                    assert busy.status_code == 429, busy.text
                    assert busy.headers["retry-after"] == "1"
                    assert busy.json()["error"]["code"] == "rate_limit_exceeded"
                    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
                    with pytest.raises(openai.RateLimitError):
                        await sdk.completions.create(model="fake", prompt=[5, 6], max_tokens=2)
                    await sdk.close()
                    queued.cancel()
            # both clients gone: the scheduler drains
            with grpc.insecure_channel(sched.address) as ch:
                stub = scheduler_pb2_grpc.SchedulerStub(ch)
                def drained() -> bool:
                    s = stub.GetStats(scheduler_pb2.GetStatsRequest())
                    return s.num_running + s.num_waiting == 0

                assert await asyncio.to_thread(wait_until, drained, 10)

    asyncio.run(main())
    assert httpx.post(url + "/v1/completions", headers=headers, json={"prompt": [5], "max_tokens": 2}).status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401  # the key came from PAGEDSERVE_API_KEY
    sched.stop()
    r = httpx.post(url + "/v1/completions", headers=headers, json={"prompt": [5], "max_tokens": 2}, timeout=30)
    assert r.status_code == 503, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and "scheduler" in r.json()["error"]["message"]
    h = httpx.get(url + "/health", timeout=30)
    assert h.status_code == 503 and h.json()["status"] == "unhealthy"


# ---------------------------------------------------------------------------- README
def test_readme_curl_example(stack):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL) if "curl -N" in b)
    cmd = block.replace("http://127.0.0.1:8000", stack.url)
    out = subprocess.run(["bash", "-c", cmd], check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PAGEDSERVE_API_KEY": API_KEY})
    assert out.returncode == 0, out.stderr
    events = [line[6:] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).strip()
    assert chunks[-1]["usage"]["completion_tokens"] > 0
