"""The tokenizer gRPC service on the real SmolLM2 GGUF tokenizer: Encode / Decode /
ApplyChatTemplate / DetokenizeStream (multi-byte characters split across tokens, stop strings),
status codes, health, reflection, and the `python -m services.tokenizer` process."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.pagedserve.v1 import tokenizer_pb2 as pb
from services.gen.pagedserve.v1 import tokenizer_pb2_grpc
from services.grpc_server import AioGrpcServer
from services.tokenizer.server import SERVICE_NAME, TokenizerServicer
from tests.integration.loop_thread import LoopThread

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

UNICODE_TEXT = "Héllo wörld! 😀🎉 你好，世界。 Ça coûte 5 €, naïve café — ½ · ñ 🇫🇷 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from engine_core.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


def _serve(lt: LoopThread, tok):
    async def start():
        srv = AioGrpcServer("tokenizer", [SERVICE_NAME], "127.0.0.1", 0, grace_s=0.5)
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tok, max_model_len=2048), srv.server)
        await srv.start()
        await srv.set_serving(True)
        return srv

    return lt.run(start())


@pytest.fixture(scope="module")
def service(tokenizer):
    """(stub, channel, tokenizer) for an in-process server; plus one on a template-less copy."""
    lt = LoopThread()
    no_template = copy.copy(tokenizer)
    no_template.chat_template = None
    servers = [_serve(lt, tokenizer), _serve(lt, no_template)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
    yield [tokenizer_pb2_grpc.TokenizerStub(c) for c in channels], channels[0], tokenizer
    for c in channels:
        c.close()
    async def stop_all():
        for s in servers:
            await s.stop(0)

    lt.run(stop_all())
    lt.close()


def detok_stream(stub, token_chunks, *, prompt=(), stop=(), include_stop=False, finish=True):
    msgs = [pb.DetokenizeRequest(options=pb.DetokenizeOptions(prompt_token_ids=list(prompt), stop=list(stop),
                                                              include_stop_str_in_output=include_stop))]
    msgs += [pb.DetokenizeRequest(token_ids=c) for c in token_chunks]
    if finish:
        msgs.append(pb.DetokenizeRequest(finished=True))
    return list(stub.DetokenizeStream(iter(msgs), timeout=30))


def test_encode_decode(service):
    (stub, _), _, tok = service
    ids = list(stub.Encode(pb.EncodeRequest(text=UNICODE_TEXT), timeout=10).token_ids)
    assert ids == tok.encode(UNICODE_TEXT)
    assert stub.Decode(pb.DecodeRequest(token_ids=ids), timeout=10).text == UNICODE_TEXT
    assert list(stub.Encode(pb.EncodeRequest(text="hi", add_special_tokens=False)).token_ids) == \
        tok.encode("hi", add_special_tokens=False)
    # Special tokens: skipped by default, kept on request.
    eos = tok.eos_token_ids[0]
    assert stub.Decode(pb.DecodeRequest(token_ids=ids[:2] + [eos])).text == tok.decode(ids[:2])
    assert stub.Decode(pb.DecodeRequest(token_ids=[eos], skip_special_tokens=False)).text == \
        tok.decode([eos], skip_special_tokens=False) != ""
    long_text = "word " * 5000  # big enough to go through a worker thread
    assert list(stub.Encode(pb.EncodeRequest(text=long_text)).token_ids) == tok.encode(long_text)


def test_decode_rejects_bad_ids(service):
    (stub, _), _, tok = service
    for bad in ([1, tok.vocab_size], [-3]):
        with pytest.raises(grpc.RpcError) as ei:
            stub.Decode(pb.DecodeRequest(token_ids=bad), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the vocabulary" in ei.value.details()


def test_apply_chat_template(service):
    (stub, no_template_stub), _, tok = service
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Qu'est-ce que 😀 ?"}]
    req = pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(**m) for m in messages], tokenize=True)
    resp = stub.ApplyChatTemplate(req, timeout=10)
    want = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert resp.prompt == want and resp.prompt.endswith("<|im_start|>assistant\n")
    assert list(resp.token_ids) == tok.apply_chat_template(messages, tokenize=True)
    resp = stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=req.messages, add_generation_prompt=False))
    assert resp.prompt == tok.apply_chat_template(messages, add_generation_prompt=False) and not resp.token_ids
    # extra_json keys reach the template (here: harmlessly ignored), bad JSON is the client's fault.
    ok = pb.ChatMessage(role="user", content="hi", extra_json='{"name": "bob"}')
    assert stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=[ok])).prompt
    for bad_req, match in [
        (pb.ApplyChatTemplateRequest(), "messages must not be empty"),
        (pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(role="user", content="x", extra_json="{nope")]),
         "extra_json"),
        (pb.ApplyChatTemplateRequest(messages=[pb.ChatMessage(content="no role")]), "role"),
    ]:
        with pytest.raises(grpc.RpcError) as ei:
            stub.ApplyChatTemplate(bad_req, timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in ei.value.details()
    # A model without a chat template: INVALID_ARGUMENT with the tokenizer's explanation.
    with pytest.raises(grpc.RpcError) as ei:
        no_template_stub.ApplyChatTemplate(req, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no chat template" in ei.value.details()
    assert stub.Encode(pb.EncodeRequest(text="still serving")).token_ids


def test_detokenize_stream_multibyte(service):
    (stub, _), _, tok = service
    prompt = tok.encode("Say something in many scripts:")
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    # The text really has characters split across byte-level tokens.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    for chunk in (1, 3):
        chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
        resps = detok_stream(stub, chunks, prompt=prompt)
        assert len(resps) == len(chunks) + 2  # one response per request message (options, chunks, finished)
        assert "".join(r.text for r in resps) == tok.decode(ids) == UNICODE_TEXT
        assert all("\ufffd" not in r.text for r in resps)  # never half a character
        assert resps[-1].finished and not any(r.finished for r in resps[:-1])
        assert resps[-1].num_output_tokens == len(ids)
    # Some deltas were held back until the character completed.
    resps = detok_stream(stub, [[t] for t in ids])
    assert any(r.text == "" for r in resps[:-1])


def test_detokenize_stream_stop_string(service):
    (stub, _), _, tok = service
    ids = tok.encode("The answer is 42. STOP here, and more text follows.", add_special_tokens=False)
    resps = detok_stream(stub, [[t] for t in ids], stop=["STOP"], finish=False)
    last = resps[-1]
    assert last.finished and last.stop_str == "STOP"
    assert "".join(r.text for r in resps) == "The answer is 42. "
    assert all(not r.stop_str for r in resps[:-1])
    assert last.num_output_tokens < len(ids)  # the stream ended at the stop, not at the last token
    resps = detok_stream(stub, [ids], stop=["STOP"], include_stop=True, finish=False)
    assert len(resps) == 2 and resps[1].text == "The answer is 42. STOP" and resps[1].stop_str == "STOP"


def test_detokenize_stream_errors(service):
    (stub, _), _, tok = service
    with pytest.raises(grpc.RpcError) as ei:
        detok_stream(stub, [[1, 2], [tok.vocab_size + 5]])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.DetokenizeStream(iter([pb.DetokenizeRequest(token_ids=[1]),
                                         pb.DetokenizeRequest(options=pb.DetokenizeOptions())]), timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detok_stream(stub, [tok.encode("fine")])[-1].finished  # still serving


def test_detokenize_batch_many_samples_one_message_per_step(service):
    """DetokenizeBatch: per-key incremental text equal to DetokenizeStream's (multi-byte characters
    held back, stop strings trimmed), one answer per message, per-entry errors in-band."""
    (stub, _), _, tok = service
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    stop_ids = tok.encode("The answer is 42. STOP here, and more text follows.", add_special_tokens=False)
    opts = pb.DetokenizeOptions(prompt_token_ids=tok.encode("Say:"))
    stop_opts = pb.DetokenizeOptions(stop=["STOP"])
    steps = max(len(ids), len(stop_ids))
    msgs = []
    for i in range(steps + 1):
        entries = []
        if i <= len(ids):  # key 1: the unicode text, one token per step, then finished
            e = pb.DetokenizeEntry(key=1, token_ids=ids[i:i + 1], finished=i == len(ids))
            entries.append(e)
        if i < len(stop_ids):  # key 2: stops at "STOP"; its later entries are errors (key gone)
            entries.append(pb.DetokenizeEntry(key=2, token_ids=[stop_ids[i]]))
        if i == 0:
            entries[0].options.CopyFrom(opts)
            entries[1].options.CopyFrom(stop_opts)
            entries.append(pb.DetokenizeEntry(key=3, options=stop_opts, token_ids=[tok.vocab_size + 5]))
            entries.append(pb.DetokenizeEntry(key=4, token_ids=[1]))  # no options first
        if i == 1:
            entries.append(pb.DetokenizeEntry(key=1, options=opts))  # options twice
        msgs.append(pb.DetokenizeBatchRequest(entries=entries))
    resps = list(stub.DetokenizeBatch(iter(msgs), timeout=30))
    assert len(resps) == len(msgs) and all(len(r.results) == len(m.entries) for r, m in zip(resps, msgs))
    by_key: dict[int, list] = {}
    for r in resps:
        for x in r.results:
            by_key.setdefault(x.key, []).append(x)
    assert "outside the vocabulary" in by_key[3][0].error and "must carry options" in by_key[4][0].error
    errors1 = [x.error for x in by_key[1] if x.error]
    assert "only allowed on a key's first entry" in errors1[0]  # which drops key 1's state:
    assert all("unknown key 1" in e for e in errors1[1:]) and len(errors1) == len(ids)
    text2 = "".join(x.text for x in by_key[2] if not x.error)
    stopped = next(x for x in by_key[2] if x.stop_str)
    assert text2 == "The answer is 42. " and stopped.finished and stopped.num_output_tokens < len(stop_ids)
    # A clean run of key 1 alone: the concatenated deltas equal a one-shot decode, never half a character.
    msgs = [pb.DetokenizeBatchRequest(entries=[pb.DetokenizeEntry(key=9, options=opts, token_ids=ids[:1])])]
    msgs += [pb.DetokenizeBatchRequest(entries=[pb.DetokenizeEntry(key=9, token_ids=[t])]) for t in ids[1:]]
    msgs.append(pb.DetokenizeBatchRequest(entries=[pb.DetokenizeEntry(key=9, finished=True)]))
    results = [r.results[0] for r in stub.DetokenizeBatch(iter(msgs), timeout=30)]
    assert "".join(x.text for x in results) == UNICODE_TEXT
    assert all("\ufffd" not in x.text for x in results) and results[-1].finished
    assert results[-1].num_output_tokens == len(ids)
    # close drops a key: a later entry for it is an unknown key
    msgs = [pb.DetokenizeBatchRequest(entries=[pb.DetokenizeEntry(key=5, options=opts, token_ids=ids[:2])]),
            pb.DetokenizeBatchRequest(entries=[pb.DetokenizeEntry(key=5, close=True)]),
            pb.DetokenizeBatchRequest(entries=[pb.DetokenizeEntry(key=5, token_ids=ids[2:3])])]
    results = [r.results[0] for r in stub.DetokenizeBatch(iter(msgs), timeout=30)]
    assert results[1].finished and not results[1].error and "unknown key 5" in results[2].error


def test_get_info_health(service):
    (stub, _), channel, tok = service
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.vocab_size == tok.vocab_size == 49152
    assert list(info.eos_token_ids) == tok.eos_token_ids
    assert info.has_chat_template and info.max_model_len == 2048 and info.bos_token_id == tok.bos_token_id
    hs = health_pb2_grpc.HealthStub(channel)
    assert hs.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_process_health_reflection_sigterm(gguf_path):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "services.tokenizer", "--model", gguf_path, "--port", "0",
                             "--grpc-reflection"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "tokenizer listening on" in line, proc.stderr.read() if proc.poll() is not None else line
        ch = grpc.insecure_channel(line.rsplit(" ", 1)[-1].strip())
        hs = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        statuses = [hs.Check(req, timeout=5).status]
        for _ in range(600):  # until the tokenizer has loaded (NOT_SERVING meanwhile)
            if statuses[-1] == health_pb2.HealthCheckResponse.SERVING:
                break
            threading.Event().wait(0.05)
            statuses.append(hs.Check(req, timeout=5).status)
        assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
        info = tokenizer_pb2_grpc.TokenizerStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
        assert info.model_name == "SmolLM2-135M-Instruct.Q4_1" and not info.HasField("max_model_len")
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5))
        assert SERVICE_NAME in {s.name for s in resp.list_services_response.service}
        ch.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
