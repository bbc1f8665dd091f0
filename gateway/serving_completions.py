"""POST /v1/completions: prompt as a string, strings, token ids or lists of token ids; n samples
per prompt (choice index = prompt index * n + sample index); echo; logprobs=k; streaming."""
from __future__ import annotations

import dataclasses
import time

from fastapi import Request
from fastapi.responses import Response

from engine_core.sampling_params import SamplingParams
from gateway.backend import ModelFacts
from gateway.errors import bad_request
from gateway.generation import PromptGeneration, merge_events
from gateway.logprobs import completion_logprobs, token_table
from gateway.params import (
    build_sampling_params,
    check_prompt_ids,
    check_sequence_group_fields,
    resolve_max_tokens,
    scheduling_kwargs,
)
from gateway.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from gateway.serving import BaseServing, random_id
from gateway.sse_chunks import ChunkRenderer, dump
from gateway.streaming import sse


@dataclasses.dataclass
class _Prepared:
    gens: list[PromptGeneration]
    echo_texts: list[str]


class CompletionsServing(BaseServing):
    async def create(self, request: Request) -> Response:
        req = self.parse(CompletionRequest, await request.body())
        self.check_stream_options(req)
        facts = await self.check_model(req)
        check_sequence_group_fields(req)
        if req.suffix:
            raise bad_request("suffix is not supported by this model.", param="suffix")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported (no prompt logprobs).", param="echo")
        sp = build_sampling_params(req, facts, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                   max_n=self.config.max_n)
        rid = random_id("cmpl")
        prepared = await self.run(request, self._prepare(req, sp, facts, rid))
        if isinstance(prepared, Response):
            return prepared
        model = req.model or facts.name
        if req.stream:
            return self.stream(prepared.gens, lambda: self._chunks(req, prepared, rid, model))
        result = await self.run(request, self._collect(req, prepared, rid, model))
        return result if isinstance(result, Response) else self.json(result)

    # ------------------------------------------------------------------ prompts
    async def _prepare(self, req: CompletionRequest, sp: SamplingParams, facts: ModelFacts, rid: str) -> _Prepared:
        p = req.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        many = len(items) > 1
        admission = self.backend.admission
        admission.check_prompt_count(len(items))
        admission.check_capacity(len(items) * max(req.n, req.best_of or 1), facts.capacity, req.n)
        for i, item in enumerate(items):
            if isinstance(item, str):
                admission.check_text_size(len(item), facts.max_model_len, f"prompt.{i}" if many else "prompt")

        async def tokenize(indices: list[int]) -> list[tuple[list[int], str]]:
            texts = [i for i in indices if isinstance(items[i], str)]
            if len(texts) > 1:  # one EncodeBatch call for the batch's strings
                encoded = dict(zip(texts, await self.backend.encode_batch([items[i] for i in texts])))
            else:
                encoded = {i: await self.backend.encode(items[i]) for i in texts}
            out = []
            for i in indices:
                item = items[i]
                if isinstance(item, str):
                    out.append((encoded[i], item))
                    continue
                check_prompt_ids(item, facts, f"prompt.{i}" if many else "prompt")
                out.append((list(item), await self.backend.decode(item, sp.skip_special_tokens) if req.echo else ""))
            return out

        tokenized = await admission.tokenize_all(items, tokenize)
        gens = []
        for i, (ids, _) in enumerate(tokenized):
            psp = dataclasses.replace(sp)
            resolve_max_tokens(psp, len(ids), facts)
            gens.append(PromptGeneration(self.backend, f"{rid}-{i}", ids, psp, want_logprobs=req.logprobs is not None,
                                         **scheduling_kwargs(req)))
        await self.start(gens)
        return _Prepared(gens, [t for _, t in tokenized] if req.echo else ["" for _ in tokenized])

    # ------------------------------------------------------------------ full answer
    async def _collect(self, req: CompletionRequest, prep: _Prepared, rid: str, model: str) -> CompletionResponse:
        n = req.n
        total = len(prep.gens) * n
        texts: list[list[str]] = [[prep.echo_texts[i // n]] for i in range(total)]
        lps: list[list] = [[] for _ in range(total)]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * total
        try:
            async for pi, ev in merge_events(prep.gens):
                idx = pi * n + ev.index
                texts[idx].append(ev.text)
                if ev.logprobs:
                    lps[idx].extend(ev.logprobs)
                if ev.finish_reason is not None:
                    finish[idx] = (ev.finish_reason, ev.stop_reason)
        finally:
            for g in prep.gens:
                g.close()
        choices = []
        k = req.logprobs
        table = await token_table(self.backend, [x for c in lps for x in c], k) if k is not None else {}
        for idx in range(total):
            logprobs = None
            if k is not None:
                logprobs, _ = completion_logprobs(lps[idx], table, k, len(prep.echo_texts[idx // n]))
            choices.append(CompletionChoice(index=idx, text="".join(texts[idx]), logprobs=logprobs,
                                            finish_reason=finish[idx][0], stop_reason=finish[idx][1]))
        return CompletionResponse(id=rid, model=model, choices=choices, usage=self.usage(prep.gens))

    # ------------------------------------------------------------------ streaming
    async def _chunks(self, req: CompletionRequest, prep: _Prepared, rid: str, model: str):
        created = int(time.time())
        n = req.n
        k = req.logprobs
        offsets: dict[int, int] = {}

        render = ChunkRenderer(rid, "text_completion", created, model).choice

        def chunk(idx: int, text: str, logprobs: CompletionLogprobs | None = None, finish: str | None = None,
                  stop_reason: int | str | None = None) -> bytes:
            return render({"index": idx, "text": text, "logprobs": dump(logprobs), "finish_reason": finish,
                           "stop_reason": stop_reason})

        if req.echo:
            for idx in range(len(prep.gens) * n):
                text = prep.echo_texts[idx // n]
                offsets[idx] = len(text)
                yield chunk(idx, text)
        async for pi, ev in merge_events(prep.gens):
            idx = pi * n + ev.index
            logprobs = None
            if k is not None and ev.logprobs:
                table = await token_table(self.backend, ev.logprobs, k)
                logprobs, offsets[idx] = completion_logprobs(ev.logprobs, table, k, offsets.get(idx, 0))
            if not ev.text and logprobs is None and ev.finish_reason is None:
                continue
            yield chunk(idx, ev.text, logprobs, ev.finish_reason, ev.stop_reason)
        if req.include_usage:
            yield sse(CompletionStreamResponse(id=rid, created=created, model=model, choices=[],
                                               usage=self.usage(prep.gens)).model_dump_json())
