"""Issue 16, findings 1 and 5: one request can no longer fail everyone else's. Against the real
tokenizer service and the fake scheduler (in-process, no model)."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from gateway.config import GatewayConfig
from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.integration.fake_scheduler import FakeScheduler
from tests.integration.gateway_stack import InProcessStack

pytestmark = pytest.mark.timeout(120)

MAX_LEN = 256
QUEUE = 16  # the fake reports --max-queue-len 16 and 64 running slots: 80 samples at most


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def stack(tok):
    st = InProcessStack()
    tok_addr = st.start_tokenizer(tok, MAX_LEN)
    fake = FakeScheduler.for_tokenizer(tok, max_model_len=MAX_LEN, token_delay_s=0.001, max_queue_len=QUEUE)
    url = st.start_gateway(GatewayConfig(scheduler_address=st.start_scheduler(fake), tokenizer_address=tok_addr,
                                         max_prompts=128))
    yield st, url, tok_addr
    st.close()


async def _post(client: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await client.post("/v1/completions", json=body)


def test_too_many_prompts_is_400_before_any_work(stack):
    _, url, _ = stack
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * 5000, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_prompts" and "5000" in err["message"] and "128" in err["message"]


def test_flooding_request_does_not_fail_other_users(stack):
    """Two requests with the most prompts allowed, each prompt distinct and long enough to be
    tokenized in a worker thread, alongside 20 ordinary requests: every ordinary one succeeds."""
    _, url, _ = stack

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            flood = [{"prompt": [f"{i} " + "word " * 600 for i in range(128)], "max_tokens": 1}
                     for _ in range(2)]
            normal = [{"prompt": f"hello {i}", "max_tokens": 4} for i in range(20)]
            return await asyncio.gather(*(_post(c, b) for b in flood), *(_post(c, b) for b in normal))

    rs = asyncio.run(go())
    statuses = [r.status_code for r in rs]
    # the flood requests: 400 (over the context) is fine, a 5xx is not
    assert all(s < 500 for s in statuses[:2]), statuses
    assert statuses[2:] == [200] * 20, [r.text for r in rs[2:] if r.status_code != 200][:2]


def test_huge_prompt_is_rejected_without_tokenizing(stack):
    _, url, _ = stack
    huge = "x" * (128 * MAX_LEN + 1)  # longer than any MAX_LEN tokens can be
    r = httpx.post(f"{url}/v1/completions", json={"prompt": huge, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": huge}]},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_request_prompt_token_cap(tok):
    st = InProcessStack()
    try:
        fake = FakeScheduler([1, 2, 3], vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids[0],
                             max_model_len=MAX_LEN)
        url = st.start_gateway(GatewayConfig(scheduler_address=st.start_scheduler(fake),
                                             tokenizer_address=st.start_tokenizer(tok, MAX_LEN),
                                             max_request_prompt_tokens=100))
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [[5] * 60, [6] * 60], "max_tokens": 1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [[5] * 40, [6] * 40], "max_tokens": 1}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        st.close()


@pytest.mark.parametrize("body", [{"prompt": "hi", "n": 81}, {"prompt": ["hi"] * 41, "n": 2}])
def test_never_admissible_is_400_not_429(stack, body):
    """Finding 5: more samples than queue + running slots can ever hold is a 400 (a 429 invites retries
    that can never succeed)."""
    _, url, _ = stack
    r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "request_too_large" and "80" in r.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * 40, "n": 2, "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_tokenizer_sheds_load_with_resource_exhausted(tok):
    """The tokenizer service answers RESOURCE_EXHAUSTED to calls beyond --max-in-flight (never
    CANCELLED), and serves normally again once the burst is over."""
    from services.grpc_server import AioGrpcServer
    from services.tokenizer.server import SERVICE_NAME, TokenizerServicer
    from tests.integration.loop_thread import LoopThread

    lt = LoopThread(name="tok-shed", default_timeout=60)

    async def go():
        srv = AioGrpcServer("tokenizer", [SERVICE_NAME], "127.0.0.1", 0, grace_s=0.2)
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tok, max_in_flight=2), srv.server)
        await srv.start()
        await srv.set_serving(True)
        codes = []
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = tokenizer_pb2_grpc.TokenizerStub(ch)

            async def one(i):
                try:
                    await stub.Encode(tokenizer_pb2.EncodeRequest(text=f"{i} " + "word " * 4000), timeout=30)
                    return "OK"
                except grpc.aio.AioRpcError as e:
                    return e.code().name

            codes = await asyncio.gather(*(one(i) for i in range(40)))
            after = await one(99)
        await srv.stop(0)
        return codes, after

    try:
        codes, after = lt.run(go())
    finally:
        lt.close()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
    assert after == "OK"


def test_many_prompts_go_in_batched_tokenizer_calls(stack, tok):
    """48 string prompts go through EncodeBatch (batches of 16): every prompt's tokens land on its own
    choice, in prompt order, and usage counts them all."""
    _, url, _ = stack
    prompts = [f"prompt number {i}" for i in range(48)]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompts, "max_tokens": 1, "echo": True}, timeout=30)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["text"][:len(p)] for c, p in zip(choices, prompts)] == prompts
    assert r.json()["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)


def test_encode_batch_rpc(stack, tok):
    _, _, tok_addr = stack
    with grpc.insecure_channel(tok_addr) as ch:
        stub = tokenizer_pb2_grpc.TokenizerStub(ch)
        texts = ["Hello there", "", "Café 😀"]
        resp = stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=texts), timeout=10)
        assert [list(x.token_ids) for x in resp.results] == [tok.encode(t) for t in texts]
        with pytest.raises(grpc.RpcError) as ei:
            stub.EncodeBatch(tokenizer_pb2.EncodeBatchRequest(texts=["x"] * 257), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "256" in ei.value.details()
