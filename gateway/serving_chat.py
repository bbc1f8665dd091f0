"""POST /v1/chat/completions: messages rendered by the model's chat template (tokenizer service,
add_generation_prompt), n samples, logprobs + top_logprobs, streaming with a role chunk first."""
from __future__ import annotations

import dataclasses
import json
import time

from fastapi import Request
from fastapi.responses import Response

from engine_core.sampling_params import SamplingParams
from gateway.backend import ModelFacts
from gateway.errors import APIError, bad_request
from gateway.generation import PromptGeneration, merge_events
from gateway.logprobs import chat_logprobs, token_table
from gateway.params import build_sampling_params, resolve_max_tokens
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
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request(f"response_format type {req.response_format.type[:50]!r} is not supported "
                              "(structured output is not implemented).", param="response_format")
        if req.tools and req.tool_choice != "none":
            raise bad_request("tools are not supported by this server.", param="tools")
        if not facts.has_chat_template:
            raise APIError(400, f"The model {facts.name} has no chat template, so it cannot take messages: "
                           "use /v1/completions with a plain prompt.", param="messages", code="no_chat_template")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_completion_tokens is not None:
            max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, field = req.max_tokens, "max_tokens"
        sp = build_sampling_params(req, facts, max_tokens=max_tokens, logprobs=k, logprobs_field="top_logprobs",
                                   max_tokens_field=field, max_n=self.config.max_n)
        messages = [message_to_proto(i, m) for i, m in enumerate(req.messages)]
        rid = random_id("chatcmpl")
        prepared = await self.run(request, self._prepare(req, messages, sp, facts, rid, k))
        if isinstance(prepared, Response):
            return prepared
        model = req.model or facts.name
        if req.stream:
            return self.stream([prepared], lambda: self._chunks(req, prepared, rid, model, k))
        result = await self.run(request, self._collect(req, prepared, rid, model, k))
        return result if isinstance(result, Response) else self.json(result)

    async def _prepare(self, req: ChatCompletionRequest, messages: list[tokenizer_pb2.ChatMessage],
                       sp: SamplingParams, facts: ModelFacts, rid: str, k: int | None) -> PromptGeneration:
        admission = self.backend.admission
        admission.check_capacity(req.n, facts.capacity, req.n)
        admission.check_text_size(sum(len(m.content) + len(m.extra_json) for m in messages), facts.max_model_len,
                                  "messages", what="messages")
        async with admission.slots:
            _, ids = await self.backend.apply_chat_template(messages, bool(req.add_generation_prompt))
        sp = dataclasses.replace(sp)
        resolve_max_tokens(sp, len(ids), facts, what="messages")
        gen = PromptGeneration(self.backend, rid, ids, sp, want_logprobs=k is not None)
        await self.start([gen])
        return gen

    async def _collect(self, req: ChatCompletionRequest, gen: PromptGeneration, rid: str, model: str,
                       k: int | None) -> ChatCompletionResponse:
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
        choices = [ChatChoice(index=i, message=ChatMessage(content="".join(texts[i])),
                              logprobs=ChatLogprobs(content=chat_logprobs(lps[i], table, k)) if k is not None else None,
                              finish_reason=finish[i][0], stop_reason=finish[i][1]) for i in range(n)]
        return ChatCompletionResponse(id=rid, model=model, choices=choices, usage=self.usage([gen]))

    async def _chunks(self, req: ChatCompletionRequest, gen: PromptGeneration, rid: str, model: str, k: int | None):
        created = int(time.time())

        render = ChunkRenderer(rid, "chat.completion.chunk", created, model).choice

        def chunk(index: int, delta: dict, logprobs: ChatLogprobs | None = None, finish: str | None = None,
                  stop_reason: int | str | None = None) -> bytes:
            return render({"index": index, "delta": delta, "logprobs": dump(logprobs), "finish_reason": finish,
                           "stop_reason": stop_reason})

        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for _, ev in merge_events([gen]):
            logprobs = None
            if k is not None and ev.logprobs:
                table = await token_table(self.backend, ev.logprobs, k)
                logprobs = ChatLogprobs(content=chat_logprobs(ev.logprobs, table, k))
            if not ev.text and logprobs is None and ev.finish_reason is None:
                continue
            # DeltaMessage's keys: content while streaming, {} on a last chunk without text.
            delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
            yield chunk(ev.index, delta, logprobs, ev.finish_reason, ev.stop_reason)
        if req.include_usage:
            yield sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                                   usage=self.usage([gen])).model_dump_json())
