"""OpenAI API shapes (pydantic): completions and chat completions requests, responses, streaming
chunks, logprobs (both APIs' shapes), usage, and the model list.

Requests are parsed with `Model.model_validate_json(body)`; scalar ints and bools are strict (a JSON
`"2"` or `true` is not an `n`), floats take ints. Unknown fields are ignored (as vLLM does), so SDKs
that send newer OpenAI fields keep working. The vLLM extras (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, include_stop_str_in_output) are top
level fields, which is where the openai SDK's `extra_body` puts them.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
)

FLOAT32_MAX = 3.4028234663852886e38


def _within_float32(v: float) -> float:
    if abs(v) > FLOAT32_MAX:
        raise ValueError("must be a finite number (at most 3.4e38 in magnitude)")
    return v


# JSON numbers only (ints accepted), never strings; never NaN / Infinity (NaN temperature sampled token 0
# forever), nor beyond float32 (the sampler's dtype: 1e308 would become inf there).
Float = Annotated[float, Field(strict=True, allow_inf_nan=False), AfterValidator(_within_float32)]

PROMPT_SHAPE_MSG = ("must be a string, an array of strings, an array of token ids (integers) "
                    "or an array of arrays of token ids")


# ---------------------------------------------------------------------------- requests
class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema: {name, schema, strict, description}
    type: StrictStr


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = False


class SamplingFields(BaseModel):
    """Fields shared by both APIs (OpenAI's, then vLLM's extras)."""

    model: StrictStr | None = None  # optional as in vLLM: the served model when omitted
    n: StrictInt = 1
    temperature: Float | None = None
    top_p: Float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    user: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: StrictInt | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool | None = True
    include_stop_str_in_output: StrictBool | None = False
    # Structured output (gateway/structured_output.py): OpenAI's response_format, vLLM's extras.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    # Scheduling (docs/scheduling.md): vLLM's priority (lower first; needs --scheduling-policy
    # priority) and a per-request timeout in seconds (queue time included; 0: none).
    priority: StrictInt | None = None
    timeout: Float | None = None
    # Beam search (vLLM's extra params; n is the beam width, beam_width an alias); non-streaming.
    use_beam_search: StrictBool | None = False
    beam_width: StrictInt | None = None
    length_penalty: Float | None = None
    early_stopping: StrictBool | None = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Any = Field(...)  # shape checked by the validator below (clear message, no input echo)
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None  # top-n alternatives per token (0: only the sampled one)
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            if all(isinstance(x, str) for x in v):
                return v
            if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                return v
            if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                   for x in v):
                return v
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        raise ValueError(PROMPT_SHAPE_MSG)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessageParam(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id, ... go to the template
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageParam] = Field(...)
    max_tokens: StrictInt | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM extras
    add_generation_prompt: StrictBool | None = True


# ---------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or stop token id that ended it


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """A chunk's delta: only the keys that are set (`{"role": "assistant", "content": ""}`, then
    `{"content": "..."}`, and `{}` on the last chunk)."""

    role: str | None = None
    content: str | None = None

    @model_serializer(mode="plain")
    def _only_set(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
