"""The gateway against a deterministic fake scheduler (in-process grpc.aio) and the real tokenizer
service: response shapes, SSE, stop strings (trim + Abort), n / multi-prompt fan-in, logprobs,
echo, disconnects (streaming and not) cancelling the scheduler call, 429 / 503 / 401 / 413 / 404,
the bad-request table, in-band stream errors. Fast: no model, ~2 ms per token."""
from __future__ import annotations

import asyncio
import copy
import json
import time

import httpx
import openai
import pytest

from gateway.config import GatewayConfig
from tests.integration.fake_scheduler import ERROR_SEED, SCRIPT_TEXT, FakeScheduler
from tests.integration.gateway_cases import (
    API_KEY,
    BAD_REQUESTS,
    MAX_BODY_BYTES,
    check_error,
    send,
)
from tests.integration.gateway_stack import InProcessStack, wait_until

pytestmark = pytest.mark.timeout(120)

MODEL = "fake-model"
MAX_LEN = 256


@pytest.fixture(scope="module")
def tok(gguf_path):
    from engine_core.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def script(tok):
    return tok.encode(SCRIPT_TEXT, add_special_tokens=False)


class Env:
    def __init__(self, tok, script) -> None:
        self.tok, self.script = tok, script
        self.stack = InProcessStack()
        self.tok_addr = self.stack.start_tokenizer(tok, MAX_LEN)
        self.fake = self.new_fake()
        self.sched_addr = self.stack.start_scheduler(self.fake)
        self.url = self.gateway()
        self.http = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})
        self.raw = httpx.Client(base_url=self.url, timeout=30)  # no default headers (the error table)

    def new_fake(self, **kw) -> FakeScheduler:
        return FakeScheduler(self.script, vocab_size=self.tok.vocab_size, eos_token_id=self.tok.eos_token_ids[0],
                             max_model_len=MAX_LEN, model_name=MODEL, **kw)

    def gateway(self, **kw) -> str:
        cfg = {"scheduler_address": self.sched_addr, "tokenizer_address": self.tok_addr, "api_key": API_KEY,
               "max_body_bytes": MAX_BODY_BYTES}
        cfg.update(kw)
        return self.stack.start_gateway(GatewayConfig(**cfg))

    def text(self, n: int, offset: int = 0) -> str:
        ids = [self.script[(offset + i) % len(self.script)] for i in range(n)]
        return self.tok.decode(ids)

    def post(self, path: str, **body) -> httpx.Response:
        return self.http.post(path, json=body)

    def sse(self, path: str, **body) -> list:
        out = []
        with self.http.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    out.append(data if data == "[DONE]" else json.loads(data))
        return out


@pytest.fixture(scope="module")
def env(tok, script):
    e = Env(tok, script)
    yield e
    e.http.close()
    e.raw.close()
    e.stack.close()


def test_models_health_version(env):
    models = env.http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == MAX_LEN and models["data"][0]["object"] == "model"
    assert env.http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert env.http.get("/v1/models/other").status_code == 404
    h = httpx.get(env.url + "/health")  # no key needed outside /v1
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert httpx.get(env.url + "/version").json()["version"]


def test_completion_greedy_text_usage(env):
    r = env.post("/v1/completions", model=MODEL, prompt="Hello there", max_tokens=12, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["text"] == env.text(12)
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["logprobs"] is None
    n_prompt = len(env.tok.encode("Hello there"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    sent = env.fake.requests[-1]
    assert list(sent.prompt_token_ids) == env.tok.encode("Hello there")
    assert sent.sampling_params.max_tokens == 12 and sent.sampling_params.temperature == 0
    assert not sent.sampling_params.stop  # stop strings stay in the gateway


def test_chat_default_max_tokens_fills_context(env):
    r = env.post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = body["usage"]["prompt_tokens"]
    assert env.fake.requests[-1].sampling_params.max_tokens == MAX_LEN - prompt
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == MAX_LEN - prompt


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_trims_and_aborts(env, stream):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "temperature": 0, "stop": ["fox", "never"]}
    before = len(env.fake.finished)
    if stream:
        events = env.sse("/v1/completions", **body)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert events[-2]["choices"][0]["stop_reason"] == "fox"
    else:
        choice = env.post("/v1/completions", **body).json()["choices"][0]
        text = choice["text"]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "fox"
    assert text == " The quick brown "
    # The scheduler was told (Abort with stop_str) and finished the request itself: no cancellation.
    assert wait_until(lambda: len(env.fake.finished) > before)
    assert not env.fake.running


def test_stop_string_with_scheduler_ignoring_abort(env):
    fake = env.new_fake(ignore_abort=True, token_delay_s=0.05)
    url = env.gateway(scheduler_address=env.stack.start_scheduler(fake), api_key=None)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "temperature": 0, "stop": "fox"},
                   timeout=30).json()
    assert time.monotonic() - t0 < 5  # not the 10 s the 200 tokens would take
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (" The quick brown ", "stop")
    assert r["usage"]["completion_tokens"] == 4
    assert wait_until(lambda: fake.cancelled and not fake.running, 5)


def test_stop_usage_and_include_stop(env):
    r = env.post("/v1/completions", prompt="x", max_tokens=40, temperature=0, stop="fox",
                 include_stop_str_in_output=True).json()
    assert r["choices"][0]["text"] == " The quick brown fox"
    assert r["usage"]["completion_tokens"] == 4  # " The", " quick", " brown", " fox": nothing after the stop


def test_stop_string_in_one_sample_aborts_only_that_sample(env):
    fox = env.tok.encode(" fox", add_special_tokens=False)[0]
    L = len(env.script)
    seed = next(s for s in range(1000) if (s * 7) % L == env.script.index(fox) - 3)
    r = env.post("/v1/completions", prompt="x", n=2, max_tokens=20, temperature=1.0, seed=seed, stop="fox").json()
    assert [c["text"] for c in r["choices"]] == [" The quick brown ", " quick brown "]  # sample 1: one ahead
    assert [c["finish_reason"] for c in r["choices"]] == ["stop", "stop"]
    assert r["usage"]["completion_tokens"] == 4 + 3
    calls = [(list(a.indices), a.stop_str) for a in env.fake.abort_calls[-2:]]
    assert calls == [([1], "fox"), ([0], "fox")]


def test_stop_token_ids(env):
    dog = env.tok.encode(" dog", add_special_tokens=False)[0]
    assert dog in env.script
    r = env.post("/v1/completions", prompt="x", max_tokens=40, temperature=0, stop_token_ids=[dog]).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == dog
    assert c["text"] == " The quick brown fox jumps over the lazy dog"


def test_n_and_multiple_prompts(env):
    r = env.post("/v1/completions", prompt=["a", "b c"], n=2, max_tokens=5, temperature=0.8, seed=3).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in r["choices"])
    texts = [c["text"] for c in r["choices"]]
    assert texts[0] != texts[1]  # the n samples differ
    assert r["usage"]["completion_tokens"] == 20
    assert r["usage"]["prompt_tokens"] == len(env.tok.encode("a")) + len(env.tok.encode("b c"))
    again = env.post("/v1/completions", prompt=["a", "b c"], n=2, max_tokens=5, temperature=0.8, seed=3).json()
    assert [c["text"] for c in again["choices"]] == texts  # seeded: reproducible
    assert env.fake.requests[-1].sampling_params.n == 2  # the scheduler fans out n itself
    # token-id prompts: a list and a list of lists
    ids = env.tok.encode("hello")
    one = env.post("/v1/completions", prompt=ids, max_tokens=3, temperature=0).json()
    two = env.post("/v1/completions", prompt=[ids, ids], max_tokens=3, temperature=0).json()
    assert one["choices"][0]["text"] == two["choices"][1]["text"] == env.text(3)


def test_chat_n_stream(env):
    events = env.sse("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=6,
                     temperature=0.7, seed=11, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    texts, roles, finish = {0: "", 1: ""}, {}, {}
    for c in chunks[:-1]:
        assert c["object"] == "chat.completion.chunk" and c["usage"] is None
        (ch,) = c["choices"]
        if "role" in ch["delta"]:
            roles[ch["index"]] = ch["delta"]["role"]
        texts[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert roles == {0: "assistant", 1: "assistant"} and finish == {0: "length", 1: "length"}
    full = env.post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=6,
                    temperature=0.7, seed=11).json()
    assert [c["message"]["content"] for c in full["choices"]] == [texts[0], texts[1]]


def test_logprobs_shapes(env):
    r = env.post("/v1/completions", prompt="x", max_tokens=12, temperature=0, logprobs=2).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(lp["top_logprobs"]) == 12
    assert lp["token_logprobs"][0] == -0.25 and len(lp["top_logprobs"][0]) == 2
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    assert "".join(lp["tokens"]) == c["text"]
    # chat: bytes rebuild the text exactly, even where tokens split an emoji
    r = env.post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=len(env.script),
                 temperature=0, logprobs=True, top_logprobs=3).json()
    c = r["choices"][0]
    content = c["logprobs"]["content"]
    assert len(content) == len(env.script)
    assert b"".join(bytes(t["bytes"]) for t in content).decode() == c["message"]["content"] == SCRIPT_TEXT
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] == -0.25 for t in content)
    assert content[0]["top_logprobs"][0] == {"token": content[0]["token"], "logprob": -0.25,
                                             "bytes": content[0]["bytes"]}
    # logprobs without top_logprobs: empty alternatives
    r = env.post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                 temperature=0, logprobs=True).json()
    assert [t["top_logprobs"] for t in r["choices"][0]["logprobs"]["content"]] == [[], []]


def test_stream_logprobs_and_echo(env):
    events = env.sse("/v1/completions", prompt="Say:", max_tokens=5, temperature=0, logprobs=1, echo=False)
    lps = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"][0]["logprobs"]]
    tokens = [t for lp in lps for t in lp["tokens"]]
    offsets = [o for lp in lps for o in lp["text_offset"]]
    assert len(tokens) == 5 and offsets == [sum(len(t) for t in tokens[:i]) for i in range(5)]
    r = env.post("/v1/completions", prompt="Say:", max_tokens=3, temperature=0, echo=True).json()
    assert r["choices"][0]["text"] == "Say:" + env.text(3)
    events = env.sse("/v1/completions", prompt="Say:", max_tokens=3, temperature=0, echo=True)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Say:" + env.text(3)


def test_multibyte_stream_never_splits_characters(env):
    events = env.sse("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                     max_tokens=len(env.script), temperature=0)
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == SCRIPT_TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_stream_disconnect_cancels_scheduler_call(env):
    before = set(env.fake.cancelled)
    with env.http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
    # closing the response closes the connection
    assert wait_until(lambda: set(env.fake.cancelled) - before, 10)
    assert wait_until(lambda: not env.fake.running, 5)


def test_nonstream_disconnect_cancels_scheduler_call(env):
    before = set(env.fake.cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(env.url + "/v1/completions", json={"prompt": "x", "max_tokens": 250},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=httpx.Timeout(5, read=0.2))
    assert wait_until(lambda: set(env.fake.cancelled) - before, 10), "the scheduler call was not cancelled"
    assert wait_until(lambda: not env.fake.running, 5)


def test_in_band_error_chunk(env):
    events = env.sse("/v1/completions", prompt="x", max_tokens=10, seed=ERROR_SEED)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    assert "simulated device failure" in events[-2]["error"]["message"]
    assert any("choices" in e and e["choices"][0]["text"] for e in events[:-2])  # tokens came first
    r = env.post("/v1/completions", prompt="x", max_tokens=10, seed=ERROR_SEED)
    assert r.status_code == 500 and "simulated device failure" in r.json()["error"]["message"]
    with pytest.raises(openai.APIError, match="simulated device failure"):
        client = openai.OpenAI(base_url=env.url + "/v1", api_key=API_KEY, max_retries=0)
        for _ in client.completions.create(model=MODEL, prompt="x", max_tokens=10, seed=ERROR_SEED, stream=True):
            pass


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c.name for c in BAD_REQUESTS])
def test_bad_requests(env, case):
    check_error(send(env.raw, case), case, MAX_LEN)


def test_still_serves_after_bad_requests(env):
    for case in BAD_REQUESTS:
        send(env.raw, case)
    r = env.post("/v1/completions", prompt="x", max_tokens=3, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == env.text(3)


def test_chunked_body_too_large(env):
    def gen():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1000 + 2):
            yield b"a" * 1000
        yield b'"}'

    r = env.http.post("/v1/completions", content=gen(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_no_chat_template_400(env):
    no_template = copy.copy(env.tok)
    no_template.chat_template = None
    addr = env.stack.start_tokenizer(no_template, MAX_LEN)
    url = env.gateway(tokenizer_address=addr, api_key=None)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "chat template" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_backend_down_503(env):
    url = env.gateway(scheduler_address="127.0.0.1:1", api_key=None)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "server_error" and "scheduler" in r.json()["error"]["message"]
    h = httpx.get(url + "/health", timeout=30)
    assert h.status_code == 503 and h.json()["status"] == "unhealthy"
    url = env.gateway(tokenizer_address="127.0.0.1:1", api_key=None)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 503 and "tokenizer" in r.json()["error"]["message"]


def test_queue_full_429(env):
    fake = env.new_fake(max_in_flight=1, token_delay_s=0.05)
    url = env.gateway(scheduler_address=env.stack.start_scheduler(fake), api_key=None)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)
            busy = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
        assert wait_until(lambda: not fake.running, 5)
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("accepted_metadata", [False, True])
def test_stream_headers_on_admission(env, accepted_metadata):
    """SSE headers go out once the scheduler accepted the request: at its first token, or at
    admission when the scheduler says so in initial metadata (a queued request then gets its
    headers at once)."""
    fake = env.new_fake(first_token_delay_s=0.8, accepted_metadata=accepted_metadata)
    url = env.gateway(scheduler_address=env.stack.start_scheduler(fake), api_key=None)
    with httpx.Client(base_url=url, timeout=30) as c:
        t0 = time.monotonic()
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True,
                                                         "temperature": 0}) as r:
            headers_after = time.monotonic() - t0
            assert r.status_code == 200
            text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))
    assert text == env.text(3)
    assert (headers_after < 0.5) if accepted_metadata else (headers_after >= 0.75), headers_after


def test_concurrent_streams_async_sdk(env):
    async def main():
        client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=API_KEY, max_retries=0)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=8, temperature=0,
                stream=True)
            text = ""
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            return text

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    t0 = time.monotonic()
    texts = asyncio.run(main())
    assert texts == [env.text(8)] * 64
    assert time.monotonic() - t0 < 30
    assert wait_until(lambda: not env.fake.running, 5)


def test_decode_tokens_rpc(env, tok):
    """The tokenizer RPC behind logprob strings: each token alone, bytes exact."""
    import grpc

    from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    ids = tok.encode("é😀", add_special_tokens=False) + tok.eos_token_ids[:1]
    with grpc.insecure_channel(env.tok_addr) as ch:
        resp = tokenizer_pb2_grpc.TokenizerStub(ch).DecodeTokens(tokenizer_pb2.DecodeTokensRequest(token_ids=ids))
        assert list(resp.tokens) == [tok.decode([i], skip_special_tokens=False) for i in ids]
        assert b"".join(resp.token_bytes[:-1]).decode() == "é😀"
        assert resp.token_bytes[-1] == tok.decode(ids[-1:], skip_special_tokens=False).encode()
        with pytest.raises(grpc.RpcError) as ei:
            tokenizer_pb2_grpc.TokenizerStub(ch).DecodeTokens(tokenizer_pb2.DecodeTokensRequest(token_ids=[10**8]))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
