"""One streamed request: the SSE parser that times TTFT and ITL and counts tokens, the request body,
and the async send."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.serve_bench.datasets import BenchRequest


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0  # relative to the start of the run
    error: str = ""
    num_chunks: int = 0  # chunks carrying text
    usage_reported: bool = False
    generated_text: str = ""


class StreamParser:
    """Feeds SSE lines (with their arrival time) into a RequestResult. Pure: unit-testable with
    synthetic timings."""

    def __init__(self, result: RequestResult, start: float, chat: bool) -> None:
        self.r, self.start, self.chat = result, start, chat
        self.last: float | None = None
        self.done = False
        self._text: list[str] = []

    def feed(self, line: str, now: float) -> None:
        line = line.strip()
        if not line or line.startswith(":") or not line.startswith("data:"):
            return  # blank separators, comments, `event:` / `id:` fields
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise RuntimeError(f"bad SSE payload: {payload[:200]!r}") from None
        if isinstance(chunk, dict) and chunk.get("error"):
            err = chunk["error"]
            raise RuntimeError(f"in-band error: {err.get('message', err) if isinstance(err, dict) else err}")
        text = ""
        for choice in chunk.get("choices") or ():
            if self.chat:
                delta = choice.get("delta") or {}
                text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
            else:
                text += choice.get("text") or ""
        if text:
            if self.last is None:
                self.r.ttft = now - self.start
            else:
                self.r.itl.append(now - self.last)
            self.last = now
            self.r.num_chunks += 1
            self._text.append(text)
        usage = chunk.get("usage")
        if usage:
            self.r.usage_reported = True
            if usage.get("completion_tokens") is not None:
                self.r.output_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                self.r.prompt_len = int(usage["prompt_tokens"])

    def finish(self, now: float) -> RequestResult:
        r = self.r
        r.latency = now - self.start
        r.generated_text = "".join(self._text)
        if not r.usage_reported:
            r.output_tokens = r.num_chunks
        if r.num_chunks == 0 and r.output_tokens > 0:
            r.ttft = r.latency  # text-less stream (e.g. ids the tokenizer cannot decode)
        r.success = r.num_chunks > 0 or r.output_tokens > 0
        if not r.success:
            r.error = "the stream carried no output"
        return r


def build_body(req: BenchRequest, model: str | None, chat: bool, args: argparse.Namespace) -> dict:
    body: dict[str, Any] = {"stream": True, "temperature": args.temperature}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = req.prompt
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if args.include_usage:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.extra_body:
        body.update(json.loads(args.extra_body))
    return body


async def send_request(client, url: str, headers: dict, body: dict, req: BenchRequest, chat: bool,
                       t_origin: float) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    result.start_time = start - t_origin
    parser = StreamParser(result, start, chat)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:300]}"
                result.latency = time.perf_counter() - start
                return result
            async for line in resp.aiter_lines():
                parser.feed(line, time.perf_counter())
                if parser.done:
                    break
        parser.finish(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - any failure is one failed request, reported
        result.success = False
        result.error = f"{type(e).__name__}: {e}"[:300]
        result.latency = time.perf_counter() - start
    return result
