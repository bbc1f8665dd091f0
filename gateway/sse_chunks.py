"""SSE chunks of one streamed completion, rendered without a validated pydantic model per token.

The envelope (`id`, `object`, `created`, `model`, and the trailing `usage` / `system_fingerprint`
keys) is the same for every chunk of a response, so it is rendered once; a chunk is then the
envelope around one choice dict serialised with `json.dumps` (C). The JSON is what
`CompletionStreamResponse` / `ChatCompletionStreamResponse.model_dump_json()` give (same keys, same
order); the usage chunk, once per response, still goes through those models.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ChunkRenderer:
    def __init__(self, response_id: str, obj: str, created: int, model: str) -> None:
        head = _DUMPS({"id": response_id, "object": obj, "created": created, "model": model})
        self._head = b"data: " + head[:-1].encode() + b',"choices":['
        self._tail = b'],"usage":null,"system_fingerprint":null}\n\n'

    def choice(self, choice: dict[str, Any]) -> bytes:
        return self._head + _DUMPS(choice).encode() + self._tail


def dump(model: BaseModel | None) -> dict | None:
    """A nested model (logprobs) as the plain dict the chunk's JSON holds."""
    return None if model is None else model.model_dump()
