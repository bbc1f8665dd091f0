"""Internal Python client of the gRPC stack: tokenizer service + scheduler service.

    with PagedServeClient("127.0.0.1:50051", "127.0.0.1:50052") as client:
        for chunk in client.generate_stream("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="", flush=True)
        result = client.generate([{"role": "user", "content": "Hi"}], max_tokens=32)  # chat
        print(result.text, result.usage)

    async with AsyncPagedServeClient(sched, tok) as client:
        async for chunk in client.generate_stream("Hello"):
            ...

A prompt is a string (encoded by the tokenizer service; `chat=True` wraps it in the model's chat
template as one user message), a list of chat messages (always the chat template), or a list of
token ids (sent as is). Sampling: a SamplingParams, or its fields as keyword arguments.

Streaming: the scheduler's token ids are fed to one DetokenizeStream per sample (`index`, n > 1),
which holds back incomplete multi-byte characters and watches the stop strings; a stop string ends
that sample in the scheduler (Abort with stop_str: finish_reason "stop", blocks freed).
Each yielded GenerationChunk has the new text and token ids; a sample's last chunk has
finish_reason and usage.

`pagedserve client "prompt" --stream` (add_client_parser) is a CLI on top of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from engine_core.sampling_params import SamplingParams
from engine_core.tool_calls import (
    ToolCall,
    ToolChoice,
    parse_tool_calls,
    parse_tool_choice,
    tool_call_constraint,
    validate_tools,
)
from services import convert
from services.gen.pagedserve.v1 import (
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.grpc_server import SCHEDULER_PORT, TOKENIZER_PORT, channel_options
from services.internal_auth import InternalSecurity

DEFAULT_SCHEDULER_ADDRESS = os.environ.get("PAGEDSERVE_SCHEDULER_ADDRESS", f"127.0.0.1:{SCHEDULER_PORT}")
DEFAULT_TOKENIZER_ADDRESS = os.environ.get("PAGEDSERVE_TOKENIZER_ADDRESS", f"127.0.0.1:{TOKENIZER_PORT}")

_FINISH = {
    scheduler_pb2.FINISH_REASON_UNSPECIFIED: None,
    scheduler_pb2.FINISH_REASON_STOP: "stop",
    scheduler_pb2.FINISH_REASON_LENGTH: "length",
    scheduler_pb2.FINISH_REASON_ABORT: "abort",
    scheduler_pb2.FINISH_REASON_ERROR: "error",
}

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationChunk:
    """New output of one sample. The sample's last chunk has finish_reason (and usage) set."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None = None  # engine_core TokenLogprobs, when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string
    usage: Usage | None = None  # this sample's; prompt tokens counted in each
    error: str | None = None
    metrics: scheduler_pb2.RequestMetrics | None = None


@dataclass
class CompletionResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    # Parsed from the text when the request had tools (engine_core.tool_calls); the text is then
    # the content outside the calls (None: only calls).
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionResult]
    usage: Usage

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def make_params(sampling_params: SamplingParams | None, **kw) -> SamplingParams:
    if sampling_params is not None and kw:
        return dataclasses.replace(sampling_params, **kw)
    return sampling_params if sampling_params is not None else SamplingParams(**kw)


def _with_tools(sp: SamplingParams, tools: list[dict] | None, tool_choice,
                parallel_tool_calls: bool = True) -> tuple[SamplingParams, ToolChoice, list[dict] | None]:
    """OpenAI tools + tool_choice -> (params with the enforcing grammar, the choice, tools to render)."""
    functions = validate_tools(tools) if tools else None
    choice = parse_tool_choice(tool_choice, functions)
    constraint = tool_call_constraint(choice, functions, parallel_tool_calls) if functions else None
    if constraint is not None:
        sp = dataclasses.replace(sp, structured_outputs=constraint)
    return sp, choice, (tools if functions and choice.mode != "none" else None)


def _attach_tool_calls(result: GenerationResult, choice: ToolChoice) -> GenerationResult:
    if choice.mode == "none":
        return result
    for out in result.outputs:
        content, calls = parse_tool_calls(out.text, choice)
        if calls:
            out.text, out.tool_calls = content or "", calls
            if out.finish_reason == "stop":
                out.finish_reason = "tool_calls"
    return result


class _SampleState:
    """Per-sample bookkeeping shared by the sync and async clients."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.done = False  # a final chunk was yielded
        self.stopped_by_string = False
        self.num_output_tokens = 0


def _usage(msg: scheduler_pb2.GenerateResponse, completion_tokens: int | None = None) -> Usage:
    return Usage(prompt_tokens=msg.usage.prompt_tokens,
                 completion_tokens=msg.usage.completion_tokens if completion_tokens is None else completion_tokens,
                 cached_tokens=msg.usage.cached_tokens)


def _stop_reason(msg: scheduler_pb2.GenerateResponse) -> int | str | None:
    which = msg.WhichOneof("stop_reason")
    return getattr(msg, which) if which else None


def _detok_options(prompt_ids: list[int], sp: SamplingParams) -> tokenizer_pb2.DetokenizeOptions:
    return tokenizer_pb2.DetokenizeOptions(
        prompt_token_ids=prompt_ids, skip_special_tokens=sp.skip_special_tokens, stop=sp.stop,
        include_stop_str_in_output=sp.include_stop_str_in_output)


def _chunk(state: _SampleState, msg: scheduler_pb2.GenerateResponse, text: str,
           det: tokenizer_pb2.DetokenizeResponse | None) -> GenerationChunk:
    """The chunk for one scheduler message + its detokenizer answer; marks the sample done when final."""
    lps = [convert.token_logprobs_from_proto(x) for x in msg.logprobs] if msg.logprobs else None
    chunk = GenerationChunk(index=msg.index, text=text, token_ids=list(msg.token_ids), logprobs=lps)
    if det is not None and det.stop_str:
        state.done = state.stopped_by_string = True
        keep = max(0, det.num_output_tokens - state.num_output_tokens)
        chunk.token_ids = chunk.token_ids[:keep]
        if chunk.logprobs is not None:
            chunk.logprobs = chunk.logprobs[:keep]
        state.num_output_tokens += len(chunk.token_ids)
        chunk.finish_reason, chunk.stop_reason = "stop", det.stop_str
        chunk.usage = Usage(completion_tokens=state.num_output_tokens)  # prompt filled in by the caller
        return chunk
    state.num_output_tokens += len(chunk.token_ids)
    finish = _FINISH[msg.finish_reason]
    if finish is not None:
        state.done = True
        chunk.finish_reason, chunk.stop_reason = finish, _stop_reason(msg)
        chunk.usage = _usage(msg)
        chunk.metrics = msg.metrics
        chunk.error = msg.error_message or None
    return chunk


def _collect(request_id: str, prompt_ids: list[int], n: int, chunks) -> GenerationResult:
    outs = [CompletionResult(i) for i in range(n)]
    usage = Usage()
    for c in chunks:
        o = outs[c.index]
        o.text += c.text
        o.token_ids += c.token_ids
        if c.logprobs is not None:
            o.logprobs = (o.logprobs or []) + c.logprobs
        if c.finish_reason is not None:
            o.finish_reason, o.stop_reason, o.error = c.finish_reason, c.stop_reason, c.error
            if c.usage is not None:
                usage.prompt_tokens = c.usage.prompt_tokens
                usage.completion_tokens += c.usage.completion_tokens
                usage.cached_tokens = max(usage.cached_tokens, c.usage.cached_tokens)
    return GenerationResult(request_id, prompt_ids, outs, usage)


# ---------------------------------------------------------------------------- sync
class _SyncDetok:
    """One DetokenizeStream (one response per request message)."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, options, timeout: float | None) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._first = options
        self._responses = stub.DetokenizeStream(iter(self._q.get, None), timeout=timeout)
        self.finished = False

    def send(self, token_ids: list[int], finished: bool) -> tokenizer_pb2.DetokenizeResponse:
        req = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, finished=finished)
        if self._first is not None:
            req.options.CopyFrom(self._first)
            self._first = None
        self._q.put(req)
        resp = next(self._responses)
        if resp.finished:
            self.close()
        return resp

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._q.put(None)
            self._responses.cancel()


class PagedServeClient:
    """Blocking client. Thread-safe (gRPC channels are); one call per generate_stream iterator."""

    def __init__(self, scheduler_address: str = DEFAULT_SCHEDULER_ADDRESS,
                 tokenizer_address: str = DEFAULT_TOKENIZER_ADDRESS, *, timeout: float | None = None) -> None:
        self.scheduler_address, self.tokenizer_address = scheduler_address, tokenizer_address
        self.timeout = timeout  # per call (a whole Generate stream included); None: no deadline
        security = InternalSecurity.from_env()  # the service token / mTLS, when the stack uses them
        self._sched_ch = security.channel(scheduler_address, channel_options())
        self._tok_ch = security.channel(tokenizer_address, channel_options())
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._sched_ch)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tok_ch)

    def close(self) -> None:
        self._sched_ch.close()
        self._tok_ch.close()

    def __enter__(self) -> PagedServeClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ tokenizer
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.Encode(tokenizer_pb2.EncodeRequest(
            text=text, add_special_tokens=add_special_tokens), timeout=self.timeout).token_ids)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        req = _chat_request(messages, add_generation_prompt, tools)
        return list(self.tokenizer.ApplyChatTemplate(req, timeout=self.timeout).token_ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.Decode(tokenizer_pb2.DecodeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens), timeout=self.timeout).text

    def prompt_token_ids(self, prompt: Prompt, chat: bool = False, tools: list[dict] | None = None) -> list[int]:
        if isinstance(prompt, str):
            if chat or tools:
                return self.apply_chat_template([{"role": "user", "content": prompt}], tools=tools)
            return self.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.apply_chat_template(prompt, tools=tools)  # type: ignore[arg-type]
        return [int(t) for t in prompt]

    # ------------------------------------------------------------------ scheduler
    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
                        chat: bool = False, request_id: str | None = None, **kw) -> Iterator[GenerationChunk]:
        """Stream text deltas; grpc.RpcError on errors (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).
        Closing the iterator early cancels the request (its KV blocks are freed)."""
        sp = make_params(sampling_params, **kw)
        prompt_ids = self.prompt_token_ids(prompt, chat)
        rid = request_id or f"client-{uuid.uuid4().hex}"
        call = self.scheduler.Generate(scheduler_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=prompt_ids, sampling_params=convert.sampling_params_to_proto(sp)),
            timeout=self.timeout)
        states = [_SampleState(i) for i in range(sp.n)]
        detoks: dict[int, _SyncDetok] = {}
        prompt_tokens = len(prompt_ids)
        try:
            for msg in call:
                st = states[msg.index]
                if st.done:
                    continue  # tokens after a stop string (the Abort is on its way)
                final = msg.finish_reason != scheduler_pb2.FINISH_REASON_UNSPECIFIED
                det = None
                text = ""
                if msg.token_ids or final:
                    d = detoks.get(msg.index)
                    if d is None:
                        d = detoks[msg.index] = _SyncDetok(self.tokenizer, _detok_options(prompt_ids, sp), self.timeout)
                    det = d.send(list(msg.token_ids), final)
                    text = det.text
                chunk = _chunk(st, msg, text, det)
                if det is not None and det.stop_str and chunk.usage is not None:
                    chunk.usage.prompt_tokens = prompt_tokens
                    self.scheduler.Abort(scheduler_pb2.AbortRequest(
                        request_ids=[rid], stop_str=det.stop_str, indices=[msg.index]), timeout=self.timeout)
                yield chunk
        finally:
            call.cancel()  # no-op once finished; frees the request if the caller stopped early
            for d in detoks.values():
                d.close()

    def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *, chat: bool = False,
                 request_id: str | None = None, tools: list[dict] | None = None, tool_choice=None,
                 parallel_tool_calls: bool = True, **kw) -> GenerationResult:
        """tools / tool_choice as in OpenAI's chat API: the tools are rendered into the chat prompt,
        "required" or a named function is enforced by a grammar, and calls are parsed into
        outputs[i].tool_calls. Structured output in general: SamplingParams.structured_outputs."""
        sp, choice, render = _with_tools(make_params(sampling_params, **kw), tools, tool_choice, parallel_tool_calls)
        prompt_ids = self.prompt_token_ids(prompt, chat, render)
        rid = request_id or f"client-{uuid.uuid4().hex}"
        return _attach_tool_calls(
            _collect(rid, prompt_ids, sp.n, self.generate_stream(prompt_ids, sp, request_id=rid)), choice)

    def generate_token_ids(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams | None = None,
                           *, request_id: str | None = None, **kw) -> Iterator[scheduler_pb2.GenerateResponse]:
        """The raw scheduler stream (token ids, no detokenization)."""
        sp = make_params(sampling_params, **kw)
        call = self.scheduler.Generate(scheduler_pb2.GenerateRequest(
            request_id=request_id or f"client-{uuid.uuid4().hex}", prompt_token_ids=list(prompt_token_ids),
            sampling_params=convert.sampling_params_to_proto(sp)), timeout=self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def abort(self, request_ids: Sequence[str]) -> scheduler_pb2.AbortResponse:
        return self.scheduler.Abort(scheduler_pb2.AbortRequest(request_ids=list(request_ids)), timeout=self.timeout)

    def stats(self, include_requests: bool = False) -> scheduler_pb2.SchedulerStats:
        return self.scheduler.GetStats(scheduler_pb2.GetStatsRequest(include_requests=include_requests),
                                       timeout=self.timeout)

    def model_info(self) -> scheduler_pb2.ModelInfo:
        return self.scheduler.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=self.timeout)


def _chat_request(messages: Sequence[dict], add_generation_prompt: bool,
                  tools: list[dict] | None = None) -> tokenizer_pb2.ApplyChatTemplateRequest:
    import json

    msgs = []
    for m in messages:
        extra = {k: v for k, v in m.items() if k not in ("role", "content")}
        msgs.append(tokenizer_pb2.ChatMessage(role=m["role"], content=m.get("content") or "",
                                              extra_json=json.dumps(extra) if extra else ""))
    return tokenizer_pb2.ApplyChatTemplateRequest(messages=msgs, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, tools_json=json.dumps(tools) if tools else "")


# ---------------------------------------------------------------------------- asyncio
class _AsyncDetok:
    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, options, timeout: float | None) -> None:
        self._call = stub.DetokenizeStream(timeout=timeout)
        self._first = options
        self.finished = False

    async def send(self, token_ids: list[int], finished: bool) -> tokenizer_pb2.DetokenizeResponse:
        req = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, finished=finished)
        if self._first is not None:
            req.options.CopyFrom(self._first)
            self._first = None
        await self._call.write(req)
        resp = await self._call.read()
        if resp is grpc.aio.EOF:
            raise RuntimeError("DetokenizeStream ended early")
        if resp.finished:
            self.close()
        return resp

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._call.cancel()


class AsyncPagedServeClient:
    """asyncio client (grpc.aio); same API as PagedServeClient with `await` / `async for`.
    Create it inside the event loop that uses it."""

    def __init__(self, scheduler_address: str = DEFAULT_SCHEDULER_ADDRESS,
                 tokenizer_address: str = DEFAULT_TOKENIZER_ADDRESS, *, timeout: float | None = None) -> None:
        self.scheduler_address, self.tokenizer_address = scheduler_address, tokenizer_address
        self.timeout = timeout
        security = InternalSecurity.from_env()
        self._sched_ch = security.aio_channel(scheduler_address, channel_options())
        self._tok_ch = security.aio_channel(tokenizer_address, channel_options())
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._sched_ch)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tok_ch)

    async def close(self) -> None:
        await self._sched_ch.close()
        await self._tok_ch.close()

    async def __aenter__(self) -> AsyncPagedServeClient:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        resp = await self.tokenizer.Encode(tokenizer_pb2.EncodeRequest(
            text=text, add_special_tokens=add_special_tokens), timeout=self.timeout)
        return list(resp.token_ids)

    async def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                                  tools: list[dict] | None = None) -> list[int]:
        resp = await self.tokenizer.ApplyChatTemplate(_chat_request(messages, add_generation_prompt, tools),
                                                      timeout=self.timeout)
        return list(resp.token_ids)

    async def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        resp = await self.tokenizer.Decode(tokenizer_pb2.DecodeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens), timeout=self.timeout)
        return resp.text

    async def prompt_token_ids(self, prompt: Prompt, chat: bool = False, tools: list[dict] | None = None) -> list[int]:
        if isinstance(prompt, str):
            if chat or tools:
                return await self.apply_chat_template([{"role": "user", "content": prompt}], tools=tools)
            return await self.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return await self.apply_chat_template(prompt, tools=tools)  # type: ignore[arg-type]
        return [int(t) for t in prompt]

    async def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
                              chat: bool = False, request_id: str | None = None,
                              **kw) -> AsyncIterator[GenerationChunk]:
        sp = make_params(sampling_params, **kw)
        prompt_ids = await self.prompt_token_ids(prompt, chat)
        rid = request_id or f"client-{uuid.uuid4().hex}"
        call = self.scheduler.Generate(scheduler_pb2.GenerateRequest(
            request_id=rid, prompt_token_ids=prompt_ids, sampling_params=convert.sampling_params_to_proto(sp)),
            timeout=self.timeout)
        states = [_SampleState(i) for i in range(sp.n)]
        detoks: dict[int, _AsyncDetok] = {}
        try:
            async for msg in call:
                st = states[msg.index]
                if st.done:
                    continue
                final = msg.finish_reason != scheduler_pb2.FINISH_REASON_UNSPECIFIED
                det = None
                text = ""
                if msg.token_ids or final:
                    d = detoks.get(msg.index)
                    if d is None:
                        d = detoks[msg.index] = _AsyncDetok(self.tokenizer, _detok_options(prompt_ids, sp),
                                                            self.timeout)
                    det = await d.send(list(msg.token_ids), final)
                    text = det.text
                chunk = _chunk(st, msg, text, det)
                if det is not None and det.stop_str and chunk.usage is not None:
                    chunk.usage.prompt_tokens = len(prompt_ids)
                    await self.scheduler.Abort(scheduler_pb2.AbortRequest(
                        request_ids=[rid], stop_str=det.stop_str, indices=[msg.index]), timeout=self.timeout)
                yield chunk
        finally:
            call.cancel()
            for d in detoks.values():
                d.close()

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
                       chat: bool = False, request_id: str | None = None, tools: list[dict] | None = None,
                       tool_choice=None, parallel_tool_calls: bool = True, **kw) -> GenerationResult:
        sp, choice, render = _with_tools(make_params(sampling_params, **kw), tools, tool_choice, parallel_tool_calls)
        prompt_ids = await self.prompt_token_ids(prompt, chat, render)
        rid = request_id or f"client-{uuid.uuid4().hex}"
        chunks = [c async for c in self.generate_stream(prompt_ids, sp, request_id=rid)]
        return _attach_tool_calls(_collect(rid, prompt_ids, sp.n, chunks), choice)

    async def abort(self, request_ids: Sequence[str]) -> scheduler_pb2.AbortResponse:
        return await self.scheduler.Abort(scheduler_pb2.AbortRequest(request_ids=list(request_ids)),
                                          timeout=self.timeout)

    async def stats(self, include_requests: bool = False) -> scheduler_pb2.SchedulerStats:
        return await self.scheduler.GetStats(scheduler_pb2.GetStatsRequest(include_requests=include_requests),
                                             timeout=self.timeout)

    async def model_info(self) -> scheduler_pb2.ModelInfo:
        return await self.scheduler.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=self.timeout)


# ---------------------------------------------------------------------------- CLI
def _cmd_client(args: argparse.Namespace) -> int:
    try:
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, n=args.n, stop=args.stop or [],
                            ignore_eos=args.ignore_eos)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    first: float | None = None
    try:
        with PagedServeClient(args.scheduler_address, args.tokenizer_address, timeout=args.timeout) as client:
            if args.stream:
                chunks = []
                for c in client.generate_stream(args.prompt, sp, chat=args.chat):
                    if first is None and c.token_ids:
                        first = time.perf_counter()
                    chunks.append(c)
                    if sp.n == 1:
                        sys.stdout.write(c.text)
                        sys.stdout.flush()
                    else:
                        sys.stdout.write(f"[{c.index}] {c.text}\n" if c.text else "")
                result = _collect("cli", [], sp.n, chunks)
                sys.stdout.write("\n")
            else:
                result = client.generate(args.prompt, sp, chat=args.chat)
                for o in result.outputs:
                    print(o.text if sp.n == 1 else f"[{o.index}] {o.text}")
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    u = result.usage
    reasons = ",".join(str(o.finish_reason) for o in result.outputs)
    ttft = f", TTFT {1000 * (first - t0):.0f} ms" if first is not None else ""
    print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens, finish: {reasons}, "
          f"{dt:.2f}s{ttft}, {u.completion_tokens / dt:.1f} tok/s]", file=sys.stderr)
    errors = [o.error for o in result.outputs if o.error]
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


def add_client_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("client", help="generate through a running stack (scheduler + tokenizer gRPC)",
                              description="Send one prompt through the gRPC services and print the completion.")
    p.add_argument("prompt")
    p.add_argument("--scheduler-address", default=DEFAULT_SCHEDULER_ADDRESS,
                   help=f"default {DEFAULT_SCHEDULER_ADDRESS} (env PAGEDSERVE_SCHEDULER_ADDRESS)")
    p.add_argument("--tokenizer-address", default=DEFAULT_TOKENIZER_ADDRESS,
                   help=f"default {DEFAULT_TOKENIZER_ADDRESS} (env PAGEDSERVE_TOKENIZER_ADDRESS)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--n", type=int, default=1, help="number of samples")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    p.set_defaults(func=_cmd_client)
    return p


if __name__ == "__main__":  # python -m services.client "prompt" --stream
    ap = argparse.ArgumentParser(prog="python -m services.client")
    sub = ap.add_subparsers(dest="command")
    add_client_parser(sub)
    ns = ap.parse_args(["client", *sys.argv[1:]])
    sys.exit(ns.func(ns))
