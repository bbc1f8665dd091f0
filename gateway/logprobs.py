"""Scheduler TokenLogprobs -> OpenAI's two logprobs shapes.

Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`
with `logprobs=k` alternatives per position (plus the sampled token when it is not among them).
Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`
with `top_logprobs=k`. Token strings come from the tokenizer service's DecodeTokens (cached per id).
`-inf` / NaN logprobs are clamped to -9999.0 (JSON has no infinity), as vLLM does.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.backend import Backend
from gateway.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from services.gen.pagedserve.v1 import common_pb2

MIN_LOGPROB = -9999.0

TokenTable = dict[int, tuple[str, bytes]]


def _clamp(x: float) -> float:
    if math.isnan(x) or x < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(x)


async def token_table(backend: Backend, lps: Sequence[common_pb2.TokenLogprobs], k: int) -> TokenTable:
    ids: list[int] = []
    for lp in lps:
        ids.append(lp.token_id)
        ids.extend(lp.top_token_ids[:k])
    return await backend.token_strings(ids) if ids else {}


def completion_logprobs(lps: Sequence[common_pb2.TokenLogprobs], table: TokenTable, k: int,
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """(logprobs block, text offset after the last token)."""
    out = CompletionLogprobs()
    for lp in lps:
        text = table[lp.token_id][0]
        out.tokens.append(text)
        out.token_logprobs.append(_clamp(lp.logprob))
        out.text_offset.append(offset)
        offset += len(text)
        top: dict[str, float] = {}
        for tid, val in zip(lp.top_token_ids[:k], lp.top_logprobs[:k]):
            top.setdefault(table[tid][0], _clamp(val))
        top.setdefault(text, _clamp(lp.logprob))
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(lps: Sequence[common_pb2.TokenLogprobs], table: TokenTable, k: int) -> list[ChatTokenLogprob]:
    out = []
    for lp in lps:
        text, raw = table[lp.token_id]
        tops = [TopLogprob(token=table[tid][0], logprob=_clamp(val), bytes=list(table[tid][1]))
                for tid, val in zip(lp.top_token_ids[:k], lp.top_logprobs[:k])]
        out.append(ChatTokenLogprob(token=text, logprob=_clamp(lp.logprob), bytes=list(raw), top_logprobs=tops))
    return out
