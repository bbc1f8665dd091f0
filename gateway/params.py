"""OpenAI request fields -> engine_core SamplingParams (validated there, so every message names the
field) -> the scheduler's SamplingParams proto; and the context-length check with the numbers.

Stop strings stay in the gateway (the scheduler sees token ids only): the tokenizer service's
DetokenizeStream watches for them and the gateway finishes the sample through Abort(stop_str).
"""
from __future__ import annotations

from engine_core.sampling_params import SamplingParams
from engine_core.structured_output.params import StructuredOutputsParams
from gateway.backend import ModelFacts
from gateway.errors import bad_request, context_length_exceeded
from gateway.protocol import SamplingFields
from gateway.structured_output import structured_outputs_of
from services.convert import sampling_params_to_proto
from services.gen.pagedserve.v1 import common_pb2

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


def _param_of(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


def check_sequence_group_fields(req: SamplingFields) -> None:
    """best_of / beam search: what the engine cannot do is a 400 before any work. Beam search
    returns n beams (beam_width, when given, is n)."""
    best_of = getattr(req, "best_of", None)
    if req.use_beam_search:
        if req.beam_width is not None:
            if req.n not in (1, req.beam_width):
                raise bad_request(f"beam_width ({req.beam_width}) and n ({req.n}) differ: n is the beam width "
                                  "with use_beam_search", param="beam_width")
            req.n = req.beam_width
        if req.stream:
            raise bad_request("use_beam_search does not support streaming (stream must be false).",
                              param="use_beam_search")
        if best_of is not None and best_of != req.n:
            raise bad_request("best_of must be unset (or equal n) with use_beam_search.", param="best_of")
    elif req.beam_width is not None or req.length_penalty is not None or req.early_stopping is not None:
        name = next(f for f in ("beam_width", "length_penalty", "early_stopping") if getattr(req, f) is not None)
        raise bad_request(f"{name} needs use_beam_search=true.", param=name)
    if best_of is not None and best_of > req.n and req.stream:
        raise bad_request("best_of > n cannot be streamed (stream must be false).", param="best_of")


def build_sampling_params(req: SamplingFields, facts: ModelFacts, *, max_tokens: int | None,
                          logprobs: int | None, logprobs_field: str = "logprobs",
                          max_tokens_field: str = "max_tokens", max_n: int = 128,
                          structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """Validate the request's sampling fields; raises a 400 APIError naming the bad field."""
    check_scheduling_fields(req)
    if not 1 <= req.n <= max_n:
        raise bad_request(f"n must be an integer in [1, {max_n}], got {req.n}", param="n")
    if max_tokens is not None and not 1 <= max_tokens <= INT32_MAX:
        raise bad_request(f"{max_tokens_field} must be an integer >= 1, got {max_tokens}", param=max_tokens_field)
    if logprobs is not None and not 0 <= logprobs <= facts.max_logprobs:
        raise bad_request(f"{logprobs_field} must be an integer in [0, {facts.max_logprobs}], got {logprobs}",
                          param=logprobs_field)
    if req.seed is not None and not INT64_MIN <= req.seed <= INT64_MAX:
        raise bad_request("seed must fit in a signed 64-bit integer", param="seed")
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            tok = int(k)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (integers as strings), got {k[:50]!r}",
                              param="logit_bias") from None
        bias[tok] = v
    for name in ("top_k", "min_tokens"):
        v = getattr(req, name)
        if v is not None and not -1 <= v <= INT32_MAX:
            raise bad_request(f"{name} is out of range, got {v}", param=name)
    if req.stop_token_ids and any(not 0 <= t <= INT32_MAX for t in req.stop_token_ids):
        raise bad_request("stop_token_ids must be token ids >= 0", param="stop_token_ids")

    kw = {
        "n": req.n, "max_tokens": max_tokens, "logprobs": logprobs, "seed": req.seed, "logit_bias": bias,
        "stop": req.stop_list, "stop_token_ids": req.stop_token_ids or [],
        "structured_outputs": structured_outputs if structured_outputs is not None else structured_outputs_of(req),
        "best_of": getattr(req, "best_of", None), "use_beam_search": bool(req.use_beam_search),
    }
    for name in ("length_penalty", "early_stopping"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if req.use_beam_search:
        kw["temperature"] = 0.0  # beam search is deterministic (vLLM ignores sampling fields too)
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                 "include_stop_str_in_output"):
        v = getattr(req, name)
        if v is not None:
            kw[name] = v
    if not req.ignore_eos and facts.extra_eos_token_ids:  # the stack's one EOS set (backend.ModelFacts)
        kw["stop_token_ids"] = kw["stop_token_ids"] + [t for t in facts.extra_eos_token_ids
                                                       if t not in kw["stop_token_ids"]]
    try:
        sp = SamplingParams(**kw)
        sp.validate_vocab(facts.vocab_size)
    except ValueError as e:
        msg = str(e)
        param = _param_of(msg)
        if param == "logprobs":
            param = logprobs_field
        elif param == "max_tokens":
            param = max_tokens_field
            msg = msg.replace("max_tokens", max_tokens_field, 1)
        raise bad_request(msg, param=param) from None
    return sp


def check_scheduling_fields(req: SamplingFields) -> None:
    """priority and timeout (types are checked by the protocol: an integer, a finite number). Whether
    a priority is allowed at all depends on the scheduler's policy: it answers that (a 400 too)."""
    if req.priority is not None and not INT32_MIN <= req.priority <= INT32_MAX:
        raise bad_request(f"priority must fit in a signed 32-bit integer, got {req.priority}", param="priority")
    if req.timeout is not None and req.timeout < 0:
        raise bad_request(f"timeout must be a number of seconds >= 0 (0: no timeout), got {req.timeout}",
                          param="timeout")


def scheduling_kwargs(req: SamplingFields) -> dict:
    """GenerateRequest's priority and timeout_s (None: the scheduler's --request-timeout)."""
    return {"priority": req.priority or 0, "timeout_s": req.timeout}


def resolve_max_tokens(sp: SamplingParams, prompt_len: int, facts: ModelFacts, *, what: str = "prompt") -> None:
    """Set sp.max_tokens (None: all the room left) and reject requests that cannot fit."""
    if prompt_len == 0:
        raise bad_request(f"The {what} is empty (0 tokens).", param="messages" if what == "messages" else "prompt")
    limit = facts.max_model_len
    if limit <= 0:
        return
    if prompt_len >= limit or (sp.max_tokens is not None and prompt_len + sp.max_tokens > limit):
        raise context_length_exceeded(limit, prompt_len, sp.max_tokens, what)
    if sp.max_tokens is None:
        sp.max_tokens = limit - prompt_len


def check_prompt_ids(ids: list[int], facts: ModelFacts, param: str = "prompt") -> None:
    bad = next((t for t in ids if not 0 <= t < facts.vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param} contains token id {bad}, outside the vocabulary (size {facts.vocab_size})",
                          param=param)


def to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    """The scheduler's message: everything but the stop strings (text is the gateway's business)."""
    msg = sampling_params_to_proto(sp)
    del msg.stop[:]
    if msg.HasField("include_stop_str_in_output"):
        msg.ClearField("include_stop_str_in_output")
    return msg

