"""The table of bad requests every gateway test stack must answer with the documented status and
OpenAI's error shape (issue 5): wrong types, out-of-range values, missing fields, unknown model,
bad JSON, huge max_tokens, over-long prompt, bad auth, body too large, unknown route / method."""
from __future__ import annotations

from dataclasses import dataclass, field

import httpx

API_KEY = "sk-test-key"
MAX_BODY_BYTES = 64 * 1024


@dataclass
class Bad:
    name: str
    path: str
    body: object = None          # JSON-serialisable, or bytes sent as is
    status: int = 400
    param: str | None = None     # expected error.param (None: not checked)
    method: str = "POST"
    headers: dict = field(default_factory=dict)
    auth: str | None = API_KEY   # Authorization: Bearer <auth>; None: no header
    contains: tuple[str, ...] = ()  # substrings the message must contain ({max_len} is filled in)


C, CH = "/v1/completions", "/v1/chat/completions"
U = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello " * 1200  # > 1200 tokens: over any test stack's max_model_len

BAD_REQUESTS: list[Bad] = [
    # malformed bodies
    Bad("bad json", C, b'{"prompt": "x",', contains=("Invalid JSON",)),
    Bad("empty body", C, b""),
    Bad("body is an array", C, [1, 2]),
    Bad("body is a string", CH, "hello"),
    # missing fields
    Bad("missing prompt", C, {"max_tokens": 2}, param="prompt", contains=("prompt",)),
    Bad("missing messages", CH, {"max_tokens": 2}, param="messages"),
    # wrong types
    Bad("prompt is a number", C, {"prompt": 123}, param="prompt"),
    Bad("prompt empty list", C, {"prompt": []}, param="prompt"),
    Bad("prompt empty string", C, {"prompt": ""}, param="prompt", contains=("empty",)),
    Bad("prompt mixed list", C, {"prompt": ["a", 1]}, param="prompt"),
    Bad("temperature string", C, {"prompt": "x", "temperature": "hot"}, param="temperature"),
    Bad("n string", C, {"prompt": "x", "n": "2"}, param="n"),
    Bad("max_tokens float", C, {"prompt": "x", "max_tokens": 1.5}, param="max_tokens"),
    Bad("stop number", C, {"prompt": "x", "stop": 5}, param="stop"),
    Bad("seed string", C, {"prompt": "x", "seed": "abc"}, param="seed"),
    Bad("stream string", CH, {"messages": U, "stream": "yes"}, param="stream"),
    Bad("messages not a list", CH, {"messages": "hi"}, param="messages"),
    Bad("message content number", CH, {"messages": [{"role": "user", "content": 5}]}),
    Bad("message without role", CH, {"messages": [{"content": "hi"}]}),
    Bad("logprobs bool in completions", C, {"prompt": "x", "logprobs": True}, param="logprobs"),
    # out of range
    Bad("temperature negative", C, {"prompt": "x", "temperature": -1}, param="temperature", contains=("temperature",)),
    Bad("top_p zero", C, {"prompt": "x", "top_p": 0}, param="top_p"),
    Bad("top_p above one", CH, {"messages": U, "top_p": 1.5}, param="top_p"),
    Bad("n zero", C, {"prompt": "x", "n": 0}, param="n"),
    Bad("n huge", C, {"prompt": "x", "n": 100000}, param="n"),
    Bad("max_tokens negative", C, {"prompt": "x", "max_tokens": -5}, param="max_tokens"),
    Bad("max_tokens zero", CH, {"messages": U, "max_tokens": 0}, param="max_tokens"),
    Bad("max_completion_tokens negative", CH, {"messages": U, "max_completion_tokens": -1},
        param="max_completion_tokens"),
    Bad("huge max_tokens", C, {"prompt": "x", "max_tokens": 1_000_000}, param="max_tokens",
        contains=("{max_len}", "1000000")),
    Bad("presence_penalty", C, {"prompt": "x", "presence_penalty": 3}, param="presence_penalty"),
    Bad("frequency_penalty", CH, {"messages": U, "frequency_penalty": -2.5}, param="frequency_penalty"),
    Bad("repetition_penalty zero", C, {"prompt": "x", "repetition_penalty": 0}, param="repetition_penalty"),
    Bad("top_k negative", C, {"prompt": "x", "top_k": -5}, param="top_k"),
    Bad("min_p above one", C, {"prompt": "x", "min_p": 2}, param="min_p"),
    Bad("min_tokens above max_tokens", C, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, param="min_tokens"),
    Bad("logprobs too many", C, {"prompt": "x", "logprobs": 50}, param="logprobs"),
    Bad("top_logprobs too many", CH, {"messages": U, "logprobs": True, "top_logprobs": 30}, param="top_logprobs"),
    Bad("top_logprobs without logprobs", CH, {"messages": U, "top_logprobs": 2}, param="top_logprobs"),
    Bad("logit_bias key not an id", C, {"prompt": "x", "logit_bias": {"abc": 1}}, param="logit_bias"),
    Bad("logit_bias value too big", C, {"prompt": "x", "logit_bias": {"5": 500}}, param="logit_bias"),
    Bad("logit_bias id outside vocab", C, {"prompt": "x", "logit_bias": {"99999999": 1}}, param="logit_bias"),
    Bad("stop empty string", C, {"prompt": "x", "stop": [""]}, param="stop"),
    Bad("prompt token id outside vocab", C, {"prompt": [1, 99999999]}, param="prompt"),
    Bad("stream_options without stream", CH, {"messages": U, "stream_options": {"include_usage": True}},
        param="stream_options"),
    Bad("best_of below n", C, {"prompt": "x", "n": 3, "best_of": 2}, param="best_of"),
    Bad("best_of streamed", C, {"prompt": "x", "best_of": 3, "stream": True}, param="best_of"),
    Bad("beam search streamed", CH, {"messages": U, "use_beam_search": True, "stream": True},
        param="use_beam_search"),
    Bad("beam search streamed (completions)", C, {"prompt": "x", "use_beam_search": True, "n": 2, "stream": True},
        param="use_beam_search"),
    Bad("beam_width without beam search", C, {"prompt": "x", "beam_width": 2}, param="beam_width"),
    Bad("beam_width differs from n", C, {"prompt": "x", "use_beam_search": True, "beam_width": 2, "n": 3},
        param="beam_width"),
    Bad("best_of with beam search", C, {"prompt": "x", "use_beam_search": True, "n": 2, "best_of": 3},
        param="best_of"),
    Bad("length_penalty wrong type", CH, {"messages": U, "use_beam_search": True, "length_penalty": "long"},
        param="length_penalty"),
    Bad("messages empty", CH, {"messages": []}, param="messages"),
    Bad("unknown role", CH, {"messages": [{"role": "robot", "content": "hi"}]}),
    Bad("image content part", CH, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
    Bad("json_schema response_format", CH, {"messages": U, "response_format": {"type": "json_schema"}},
        param="response_format.json_schema"),
    Bad("unknown response_format", C, {"prompt": "x", "response_format": {"type": "yaml"}},
        param="response_format.type"),
    Bad("empty guided_choice", CH, {"messages": U, "guided_choice": []}, param="guided_choice"),
    Bad("two constraints", C, {"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}),
    Bad("tool_choice names no tool", CH, {"messages": U, "tools": [{"type": "function", "function": {"name": "f"}}],
                                         "tool_choice": {"type": "function", "function": {"name": "g"}}},
        param="tool_choice", contains=("not in tools",)),
    Bad("malformed tools", CH, {"messages": U, "tools": [{"type": "function", "function": "f"}]}, param="tools"),
    # scheduling (docs/scheduling.md): the test stacks schedule fcfs, so any priority but 0 is refused
    Bad("priority not an integer", C, {"prompt": "x", "priority": 1.5}, param="priority"),
    Bad("priority string", CH, {"messages": U, "priority": "high"}, param="priority"),
    Bad("priority beyond int32", C, {"prompt": "x", "priority": 2**40}, param="priority"),
    Bad("priority under fcfs", C, {"prompt": "x", "priority": 1}, param="priority",
        contains=("--scheduling-policy priority",)),
    Bad("priority under fcfs chat", CH, {"messages": U, "priority": -3}, param="priority"),
    Bad("timeout negative", C, {"prompt": "x", "timeout": -1}, param="timeout", contains=("timeout",)),
    Bad("timeout NaN", CH, b'{"messages": [{"role": "user", "content": "hi"}], "timeout": NaN}', param="timeout"),
    Bad("timeout string", C, {"prompt": "x", "timeout": "5s"}, param="timeout"),
    # over-long prompt: 400 saying the numbers
    Bad("over-long prompt", C, {"prompt": LONG_PROMPT, "max_tokens": 4}, contains=("{max_len}",)),
    Bad("over-long chat", CH, {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 4},
        contains=("{max_len}",)),
    # model, auth, size, routes
    Bad("unknown model", C, {"model": "gpt-17", "prompt": "x"}, status=404, param="model", contains=("gpt-17",)),
    Bad("unknown model chat", CH, {"model": "nope", "messages": U}, status=404, param="model"),
    Bad("no api key", C, {"prompt": "x"}, status=401, auth=None),
    Bad("wrong api key", CH, {"messages": U}, status=401, auth="sk-wrong"),
    Bad("wrong auth scheme", "/v1/models", method="GET", status=401, auth=None,
        headers={"Authorization": f"Basic {API_KEY}"}),
    Bad("body too large", C, {"prompt": "a" * (MAX_BODY_BYTES + 10)}, status=413),
    Bad("unknown route", "/v1/nope", {"x": 1}, status=404),
    Bad("unknown route GET", "/v2/models", method="GET", status=404),
    Bad("wrong method", C, method="GET", status=405),
]


def send(client: httpx.Client, case: Bad) -> httpx.Response:
    headers = dict(case.headers)
    if case.auth is not None:
        headers["Authorization"] = f"Bearer {case.auth}"
    if case.method == "GET":
        return client.get(case.path, headers=headers)
    if isinstance(case.body, bytes):
        headers["Content-Type"] = "application/json"
        return client.request(case.method, case.path, content=case.body, headers=headers)
    return client.request(case.method, case.path, json=case.body, headers=headers)


def check_error(resp: httpx.Response, case: Bad, max_len: int) -> None:
    assert resp.status_code == case.status, (case.name, resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, (case.name, body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, (case.name, err)
    assert isinstance(err["message"], str) and err["message"], case.name
    assert isinstance(err["type"], str) and err["type"], case.name
    assert len(resp.content) < 2000, (case.name, "error bodies never echo big inputs back")
    if case.param is not None:
        assert err["param"] == case.param, (case.name, err)
    for s in case.contains:
        assert s.format(max_len=max_len) in err["message"], (case.name, err["message"])
