"""gateway/sse_chunks.py renders the same JSON as the pydantic stream-response models it replaces
on the per-token path (keys, order, nulls, non-ASCII text, nested logprobs)."""
from __future__ import annotations

import json

from gateway.protocol import (
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionStreamResponse,
    DeltaMessage,
    TopLogprob,
)
from gateway.sse_chunks import ChunkRenderer, dump
from gateway.streaming import sse


def test_completion_chunk_equals_model_json():
    lp = CompletionLogprobs(text_offset=[3], token_logprobs=[-0.5], tokens=[" caf"], top_logprobs=[{" caf": -0.5}])
    render = ChunkRenderer("cmpl-1", "text_completion", 1700000000, "m\u00e9").choice
    for text, logprobs, finish, stop in (("Caf\u00e9 \U0001F600 \"q\" \\", None, None, None),
                                         ("", lp, "stop", "STOP"), ("x", None, "length", 7)):
        got = render({"index": 2, "text": text, "logprobs": dump(logprobs), "finish_reason": finish,
                      "stop_reason": stop})
        want = sse(CompletionStreamResponse(id="cmpl-1", created=1700000000, model="m\u00e9", choices=[
            CompletionChoice(index=2, text=text, logprobs=logprobs, finish_reason=finish,
                             stop_reason=stop)]).model_dump_json())
        assert got.startswith(b"data: ") and got.endswith(b"\n\n")
        assert json.loads(got[6:]) == json.loads(want[6:])
        assert list(json.loads(got[6:])) == list(json.loads(want[6:]))  # same key order


def test_chat_chunk_equals_model_json():
    lp = ChatLogprobs(content=[ChatTokenLogprob(token="hi", logprob=-0.1, bytes=[104, 105],
                                                top_logprobs=[TopLogprob(token="hi", logprob=-0.1, bytes=[104, 105])])])
    render = ChunkRenderer("chatcmpl-1", "chat.completion.chunk", 5, "m").choice
    for delta, model_delta, logprobs, finish in (({"role": "assistant", "content": ""},
                                                  DeltaMessage(role="assistant", content=""), None, None),
                                                 ({"content": "\u4f60\u597d"}, DeltaMessage(content="\u4f60\u597d"), lp, None),
                                                 ({}, DeltaMessage(), None, "length")):
        got = render({"index": 0, "delta": delta, "logprobs": dump(logprobs), "finish_reason": finish,
                      "stop_reason": None})
        want = sse(ChatCompletionStreamResponse(id="chatcmpl-1", created=5, model="m", choices=[
            ChatStreamChoice(index=0, delta=model_delta, logprobs=logprobs, finish_reason=finish)]).model_dump_json())
        assert json.loads(got[6:]) == json.loads(want[6:])
