"""POST /v1/chat/completions: messages rendered by the model's chat template (tokenizer service,
add_generation_prompt), n samples, logprobs + top_logprobs, streaming with a role chunk first."""
from __future__ import annotations

import dataclasses
import json
import time

from fastapi import Request
from fastapi.responses import Response

from engine_core.sampling_params import SamplingParams
from engine_core.tool_calls import (
    ToolChoice,
    parse_tool_calls,
    parse_tool_choice,
    tool_call_constraint,
    validate_tools,
)
from gateway.backend import ModelFacts
from gateway.errors import APIError, bad_request
from gateway.generation import PromptGeneration, merge_events
from gateway.logprobs import chat_logprobs, token_table
from gateway.params import (
    build_sampling_params,
    check_sequence_group_fields,
    resolve_max_tokens,
    scheduling_kwargs,
)
from gateway.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatMessage,
    ChatMessageParam,
)
from gateway.serving import BaseServing, random_id
from gateway.sse_chunks import ChunkRenderer, dump
from gateway.streaming import sse
from gateway.structured_output import structured_outputs_of
from gateway.tool_call_stream import ToolCallStream
from services.gen.pagedserve.v1 import tokenizer_pb2

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
TEXT_PART_TYPES = ("text", "input_text")


def message_to_proto(i: int, m: ChatMessageParam) -> tokenizer_pb2.ChatMessage:
    if m.role not in ROLES:
        raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role[:50]!r}",
                          param=f"messages.{i}.role")
    if m.content is None or isinstance(m.content, str):
        content = m.content or ""
    else:
        texts = []
        for j, part in enumerate(m.content):
            if part.type not in TEXT_PART_TYPES:
                raise bad_request(f"messages[{i}].content[{j}] has type {part.type[:50]!r}: this model only "
                                  "takes text content parts", param=f"messages.{i}.content.{j}.type")
            if part.text is None:
                raise bad_request(f"messages[{i}].content[{j}] needs a 'text' string",
                                  param=f"messages.{i}.content.{j}.text")
            texts.append(part.text)
        content = "\n".join(texts)  # engine_core.tokenizer's rule (vLLM's for string templates)
    extra = m.model_extra or {}
    return tokenizer_pb2.ChatMessage(role=m.role, content=content,
                                     extra_json=json.dumps(extra, ensure_ascii=False) if extra else "")


class ChatServing(BaseServing):
    async def create(self, request: Request) -> Response:
        req = self.parse(ChatCompletionRequest, await request.body())
        self.check_stream_options(req)
        facts = await self.check_model(req)
        if not req.messages:
            raise bad_request("messages must contain at least one message.", param="messages")
        functions, choice = self._tools(req)
        constraint = tool_call_constraint(choice, functions, req.parallel_tool_calls is not False) if functions else None
        if constraint is not None and structured_outputs_of(req) is not None:
            raise bad_request("tool_choice required / a named function cannot be combined with another "
                              "structured output constraint", param="tool_choice")
        if not facts.has_chat_template:
            raise APIError(400, f"The model {facts.name} has no chat template, so it cannot take messages: "
                           "use /v1/completions with a plain prompt.", param="messages", code="no_chat_template")
        check_sequence_group_fields(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_completion_tokens is not None:
            max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, field = req.max_tokens, "max_tokens"
        sp = build_sampling_params(req, facts, max_tokens=max_tokens, logprobs=k, logprobs_field="top_logprobs",
                                   max_tokens_field=field, max_n=self.config.max_n, structured_outputs=constraint)
        messages = [message_to_proto(i, m) for i, m in enumerate(req.messages)]
        tools_json = json.dumps(req.tools, ensure_ascii=False) if functions and choice.mode != "none" else ""
        rid = random_id("chatcmpl")
        prepared = await self.run(request, self._prepare(req, messages, sp, facts, rid, k, tools_json))
        if isinstance(prepared, Response):
            return prepared
        model = req.model or facts.name
        if req.stream:
            return self.stream([prepared], lambda: self._chunks(req, prepared, rid, model, k, choice))
        result = await self.run(request, self._collect(req, prepared, rid, model, k, choice))
        return result if isinstance(result, Response) else self.json(result)

    @staticmethod
    def _tools(req: ChatCompletionRequest) -> tuple[list[dict] | None, ToolChoice]:
        try:
            functions = validate_tools(req.tools) if req.tools is not None else None
        except ValueError as e:
            raise bad_request(f"tools: {e}", param="tools") from None
        try:
            return functions, parse_tool_choice(req.tool_choice, functions)
        except ValueError as e:
            raise bad_request(str(e), param="tool_choice") from None

    async def _prepare(self, req: ChatCompletionRequest, messages: list[tokenizer_pb2.ChatMessage],
                       sp: SamplingParams, facts: ModelFacts, rid: str, k: int | None,
                       tools_json: str = "") -> PromptGeneration:
        admission = self.backend.admission
        admission.check_capacity(req.n, facts.capacity, req.n)
        admission.check_text_size(sum(len(m.content) + len(m.extra_json) for m in messages) + len(tools_json),
                                  facts.max_model_len, "messages", what="messages")
        async with admission.slots:
            _, ids = await self.backend.apply_chat_template(messages, bool(req.add_generation_prompt), tools_json)
        sp = dataclasses.replace(sp)
        resolve_max_tokens(sp, len(ids), facts, what="messages")
        gen = PromptGeneration(self.backend, rid, ids, sp, want_logprobs=k is not None, **scheduling_kwargs(req))
        await self.start([gen])
        return gen

    async def _collect(self, req: ChatCompletionRequest, gen: PromptGeneration, rid: str, model: str,
                       k: int | None, choice: ToolChoice) -> ChatCompletionResponse:
        n = req.n
        texts: list[list[str]] = [[] for _ in range(n)]
        lps: list[list] = [[] for _ in range(n)]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * n
        try:
            async for _, ev in merge_events([gen]):
                texts[ev.index].append(ev.text)
                if ev.logprobs:
                    lps[ev.index].extend(ev.logprobs)
                if ev.finish_reason is not None:
                    finish[ev.index] = (ev.finish_reason, ev.stop_reason)
        finally:
            gen.close()
        table = await token_table(self.backend, [x for c in lps for x in c], k) if k is not None else {}
        choices = []
        for i in range(n):
            text, reason = "".join(texts[i]), finish[i][0]
            message = ChatMessage(content=text)
            if choice.mode != "none":
                content, calls = parse_tool_calls(text, choice)
                if calls:
                    message = ChatMessage(content=content, tool_calls=[c.to_openai() for c in calls])
                    reason = "tool_calls" if reason == "stop" else reason
            choices.append(ChatChoice(
                index=i, message=message, finish_reason=reason, stop_reason=finish[i][1],
                logprobs=ChatLogprobs(content=chat_logprobs(lps[i], table, k)) if k is not None else None))
        return ChatCompletionResponse(id=rid, model=model, choices=choices, usage=self.usage([gen]))

    async def _chunks(self, req: ChatCompletionRequest, gen: PromptGeneration, rid: str, model: str, k: int | None,
                      choice: ToolChoice):
        created = int(time.time())

        render = ChunkRenderer(rid, "chat.completion.chunk", created, model).choice

        def chunk(index: int, delta: dict, logprobs: ChatLogprobs | None = None, finish: str | None = None,
                  stop_reason: int | str | None = None) -> bytes:
            return render({"index": index, "delta": delta, "logprobs": dump(logprobs), "finish_reason": finish,
                           "stop_reason": stop_reason})

        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        tool_streams = [ToolCallStream(choice) for _ in range(req.n)] if choice.mode != "none" else None
        async for _, ev in merge_events([gen]):
            logprobs = None
            if k is not None and ev.logprobs:
                table = await token_table(self.backend, ev.logprobs, k)
                logprobs = ChatLogprobs(content=chat_logprobs(ev.logprobs, table, k))
            if tool_streams is not None:
                ts = tool_streams[ev.index]
                deltas = ts.feed(ev.text)
                reason = ev.finish_reason
                if reason is not None:
                    deltas += ts.finish()
                    if ts.has_calls and reason == "stop":
                        reason = "tool_calls"
                for j, d in enumerate(deltas):
                    last = reason is not None and j == len(deltas) - 1
                    yield chunk(ev.index, d, logprobs if j == 0 else None, reason if last else None,
                                ev.stop_reason if last else None)
                if reason is not None and not deltas:
                    yield chunk(ev.index, {}, logprobs, reason, ev.stop_reason)
                elif reason is None and not deltas and logprobs is not None:
                    yield chunk(ev.index, {}, logprobs)
                continue
            if not ev.text and logprobs is None and ev.finish_reason is None:
                continue
            # DeltaMessage's keys: content while streaming, {} on a last chunk without text.
            delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
            yield chunk(ev.index, delta, logprobs, ev.finish_reason, ev.stop_reason)
        if req.include_usage:
            yield sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                                   usage=self.usage([gen])).model_dump_json())
