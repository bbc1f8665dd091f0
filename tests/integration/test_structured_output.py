"""Acceptance for structured output and tool calling (issue 15), through the real stack (executor,
scheduler, tokenizer, gateway processes on 127.0.0.1, the embedded SmolLM2 on CPU) with the
official `openai` SDK: 20 prompts x 5 JSON schemas, streaming and not, all validate with
`jsonschema`; guided_choice / guided_regex always match and json_object always parses; tool_choice
"required" and a named function always give a tool call whose arguments validate; free requests'
greedy text does not change when constrained requests share their batches; invalid schemas, regexes
and grammars are 400s before any compute and the stack keeps serving."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.integration.gateway_stack import Proc, wait_until
from tests.integration.test_gateway_openai import healthy

pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.skipif(importlib.util.find_spec("xgrammar") is None, reason="xgrammar is not installed"),
]

MAX_LEN = 1024
SUBJECTS = ["a librarian", "a pilot", "a chef", "a gardener", "a painter", "a nurse", "a sailor", "a baker",
            "a teacher", "a farmer", "a doctor", "a poet", "a miner", "a tailor", "a judge", "a singer",
            "a fisher", "a potter", "a guard", "a clerk"]
NAME = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": NAME,
        "address": {"type": "object", "properties": {"city": NAME, "street": NAME, "number": {
            "type": "integer", "minimum": 1, "maximum": 999}}, "required": ["city", "street", "number"]}},
        "required": ["name", "address"]},
    "array": {"type": "object", "properties": {
        "skills": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}}, "required": ["skills"]},
    "enum": {"type": "object", "properties": {
        "mood": {"type": "string", "enum": ["happy", "sad", "calm", "angry"]},
        "level": {"type": "string", "enum": ["junior", "senior"]}}, "required": ["mood", "level"]},
    "bounded": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 90},
        "rating": {"type": "number", "minimum": 0, "maximum": 5}}, "required": ["age", "rating"]},
    "optional": {"type": "object", "properties": {
        "title": NAME, "years": {"type": "integer", "minimum": 0, "maximum": 60}, "boss": NAME,
        "remote": {"type": "boolean"}}, "required": ["title", "years"]},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 32}},
                   "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]


class Stack:
    def __init__(self) -> None:
        self.procs: list[Proc] = []
        try:
            ex = self._start(["-m", "services.executor", "--port", "0", "--device", "cpu", "--max-model-len",
                              str(MAX_LEN), "--kv-cache-memory-gb", "0.25"], "executor")
            tok = self._start(["-m", "services.tokenizer", "--port", "0", "--max-model-len", str(MAX_LEN)], "tokenizer")
            sch = self._start(["-m", "services.scheduler", "--port", "0", "--executor-address", ex.address,
                               "--tokenizer", "default"], "scheduler")
            self.gw = self._start(["-m", "gateway", "--port", "0", "--scheduler-address", sch.address,
                                   "--tokenizer-address", tok.address], "gateway")
        except BaseException:
            self.close()
            raise
        self.url = f"http://{self.gw.address}"
        self.scheduler_address, self.tokenizer_address = sch.address, tok.address
        if not wait_until(lambda: healthy(self.url) or not all(p.alive() for p in self.procs), 180, 0.25) \
                or not healthy(self.url):
            out = "\n".join(f"--- {p.name}\n{p.output()}" for p in self.procs)
            self.close()
            raise RuntimeError("stack not healthy:\n" + out)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def _start(self, args: list[str], name: str) -> Proc:
        p = Proc(args, name)
        self.procs.append(p)
        return p

    def client(self) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=900)
        c.model_name = self.model
        return c

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    try:
        yield s
    finally:
        s.close()


def run(coro):
    return asyncio.run(coro)


async def chat(client: openai.AsyncOpenAI, content: str, stream: bool, **kw) -> tuple[str, dict]:
    """(text, {"finish_reason", "tool_calls"}) of one greedy chat completion, streamed or not."""
    messages = [{"role": "user", "content": content}]
    kw.setdefault("max_tokens", 120)
    if not stream:
        r = await client.chat.completions.create(model=client.model_name, messages=messages, temperature=0, **kw)
        c = r.choices[0]
        calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls or []]
        return c.message.content or "", {"finish_reason": c.finish_reason, "tool_calls": calls}
    text, calls, finish = [], {}, None
    async for chunk in await client.chat.completions.create(model=client.model_name, messages=messages, temperature=0,
                                                           stream=True, **kw):
        for ch in chunk.choices:
            if ch.delta.content:
                text.append(ch.delta.content)
            for t in ch.delta.tool_calls or []:
                slot = calls.setdefault(t.index, {"name": "", "arguments": ""})
                if t.function and t.function.name:
                    slot["name"] = t.function.name
                if t.function and t.function.arguments:
                    slot["arguments"] += t.function.arguments
            finish = ch.finish_reason or finish
    return "".join(text), {"finish_reason": finish, "tool_calls": [calls[i] for i in sorted(calls)]}


async def bounded(coros, limit: int = 32):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


def test_json_schemas_always_validate(stack):
    """20 prompts x 5 schemas, non-streaming and streaming: 200 outputs, every one valid."""
    async def main():
        client = stack.client()
        jobs, meta = [], []
        for name, schema in SCHEMAS.items():
            rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            for subject in SUBJECTS:
                for stream in (False, True):
                    jobs.append(chat(client, f"Describe {subject} as JSON.", stream, response_format=rf))
                    meta.append((name, subject, stream))
        return meta, await bounded(jobs)

    meta, results = run(main())
    failures = []
    for (name, subject, stream), (text, info) in zip(meta, results):
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append((name, subject, stream, text, info["finish_reason"], str(e)[:200]))
    assert not failures, f"{len(failures)}/{len(results)} invalid: {failures[:3]}"
    # Greedy: the streamed text equals the non-streamed one.
    for i in range(0, len(results), 2):
        assert results[i][0] == results[i + 1][0], meta[i]


def test_choice_regex_json_object(stack):
    choices = ["positive", "negative", "neutral"]
    regex = r"[A-Z][a-z]{2,8}-[0-9]{2}"

    async def main():
        client = stack.client()
        jobs = []
        for subject in SUBJECTS[:8]:
            for stream in (False, True):
                jobs.append(chat(client, f"Is {subject} a nice job?", stream, extra_body={"guided_choice": choices}))
                jobs.append(chat(client, f"Give {subject} a code name.", stream, extra_body={"guided_regex": regex}))
                jobs.append(chat(client, f"Give the name and age of {subject} as a JSON object.", stream,
                                 max_tokens=256, response_format={"type": "json_object"}))
                jobs.append(chat(client, f"Is {subject} happy?", stream, max_tokens=8,
                                 extra_body={"structured_outputs": {"choice": ["yes", "no"]}}))
        return await bounded(jobs)

    results = run(main())
    finished = 0
    for i in range(0, len(results), 4):
        assert results[i][0] in choices
        assert re.fullmatch(regex, results[i + 1][0]), results[i + 1]
        # json_object bounds no string's length: an object max_tokens cut short cannot parse, one
        # the model finished always does.
        if results[i + 2][1]["finish_reason"] == "stop":
            assert isinstance(json.loads(results[i + 2][0]), dict), results[i + 2]
            finished += 1
        assert results[i + 3][0] in ("yes", "no")
    assert finished >= 12, f"only {finished}/16 json_object answers finished within max_tokens"


def test_completions_take_response_format_and_guided_json(stack):
    async def main():
        client = stack.client()
        schema = SCHEMAS["enum"]
        r1 = await client.completions.create(model=client.model_name, prompt="A person in JSON:", max_tokens=60, temperature=0,
                                             extra_body={"guided_json": schema})
        r2 = await client.completions.create(model=client.model_name, prompt="A person in JSON:", max_tokens=60, temperature=0,
                                             extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                                 "name": "p", "schema": schema}}})
        return r1.choices[0].text, r2.choices[0].text

    a, b = run(main())
    jsonschema.validate(json.loads(a), SCHEMAS["enum"])
    assert a == b


def test_tool_choice_required_and_named(stack):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    asks = ["What is the weather in Paris?", "What time is it in Tokyo?", "Weather in Oslo, please.",
            "Tell me the time in UTC.", "Is it cold in Rome?"]

    async def main():
        client = stack.client()
        jobs = []
        for ask in asks:
            for stream in (False, True):
                jobs.append(chat(client, ask, stream, tools=TOOLS, tool_choice="required"))
                jobs.append(chat(client, ask, stream, tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
                jobs.append(chat(client, ask, stream, tools=TOOLS,
                                 tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        return await bounded(jobs)

    results = run(main())
    for i, (text, info) in enumerate(results):
        kind = ("required", "single", "named")[i % 3]
        assert info["tool_calls"], (kind, text, info)
        for call in info["tool_calls"]:
            assert call["name"] in schemas
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
        if kind == "required":  # parallel calls: the model may list calls until max_tokens cuts it
            assert info["finish_reason"] in ("tool_calls", "length"), (text, info)
        else:
            assert info["finish_reason"] == "tool_calls", (kind, text, info)
            assert len(info["tool_calls"]) == 1
        if kind == "named":
            assert info["tool_calls"][0]["name"] == "get_weather"


def test_tool_messages_round_trip(stack):
    """An assistant tool call and the tool's answer go back into the conversation."""
    async def main():
        client = stack.client()
        first = await client.chat.completions.create(
            model=client.model_name, temperature=0, max_tokens=60, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        call = first.choices[0].message.tool_calls[0]
        question = [{"role": "user", "content": "What is the weather in Paris?"}]
        second = await client.chat.completions.create(
            model=client.model_name, temperature=0, max_tokens=20, tools=TOOLS, tool_choice="none",
            messages=question + [
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}])
        alone = await client.chat.completions.create(model=client.model_name, temperature=0, max_tokens=1,
                                                     messages=question)
        return first, second, alone

    first, second, alone = run(main())
    assert first.choices[0].finish_reason == "tool_calls"
    assert second.choices[0].message.content
    assert second.choices[0].message.tool_calls is None
    # The call (rendered as <tool_call> text for this template) and the tool's answer are in the prompt.
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_free_requests_unchanged_by_constrained_neighbours(stack):
    prompts = [f"Write one sentence about {s}." for s in SUBJECTS[:6]]

    async def main():
        client = stack.client()
        alone = await bounded([chat(client, p, False, max_tokens=24) for p in prompts])
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS["nested"]}}
        mixed = await bounded([chat(client, p, False, max_tokens=24) for p in prompts]
                              + [chat(client, f"Describe {s} as JSON.", False, response_format=rf)
                                 for s in SUBJECTS[6:14]])
        return alone, mixed[:len(prompts)]

    alone, mixed = run(main())
    assert [t for t, _ in alone] == [t for t, _ in mixed]


@pytest.mark.parametrize("body,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "bogus"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "regex"),
    ({"extra_body": {"guided_grammar": "root ::= undefined_rule"}}, "undefined_rule"),
    ({"extra_body": {"guided_choice": []}}, "choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra_body": {"guided_regex": "a+", "guided_choice": ["a"]}}, "one structured output"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, "not in tools"),
    ({"tools": [{"type": "nope"}]}, "tools"),
])
def test_bad_constraints_are_400_and_stack_keeps_serving(stack, body, needle):
    async def main():
        client = stack.client()
        with pytest.raises(openai.BadRequestError) as ei:
            await client.chat.completions.create(model=client.model_name, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, **body)
        ok = await client.chat.completions.create(model=client.model_name, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)
        return ei.value, ok

    err, ok = run(main())
    assert err.status_code == 400
    assert needle in str(err.body), err.body
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_grpc_client_library_tools_and_structured_outputs(stack):
    from services.client import PagedServeClient

    params = TOOLS[0]["function"]["parameters"]
    with PagedServeClient(stack.scheduler_address, stack.tokenizer_address) as client:
        r = client.generate("What is the weather in Paris?", temperature=0, max_tokens=60, tools=TOOLS,
                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert r.finish_reason == "tool_calls" and r.outputs[0].tool_calls[0].name == "get_weather"
        jsonschema.validate(json.loads(r.outputs[0].tool_calls[0].arguments), params)
        r = client.generate("A person:", temperature=0, max_tokens=60,
                            structured_outputs={"json": SCHEMAS["enum"]})
        jsonschema.validate(json.loads(r.text), SCHEMAS["enum"])
