"""Engine dataclasses <-> protobuf messages (protos/pagedserve/v1/*.proto), both directions.

`*_from_proto` functions validate structure and raise ValueError naming the problem (servers map
it to INVALID_ARGUMENT). Conversions are exact: `x_from_proto(x_to_proto(v)) == v` for every valid
value, including dict order of SchedulerOutput.num_scheduled_tokens (the executor's batch order).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from engine_core.executor.base import ExecutorInfo
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from engine_core.structured_output.params import StructuredOutputsParams
from services.gen.pagedserve.v1 import common_pb2, executor_pb2

__all__ = [
    "check_step_against_info",
    "deferred_bitmasks_from_proto",
    "deferred_bitmasks_to_proto",
    "executor_info_from_proto",
    "executor_info_to_proto",
    "model_runner_output_from_proto",
    "model_runner_output_to_proto",
    "sampling_params_from_proto",
    "sampling_params_to_proto",
    "scheduler_output_from_proto",
    "scheduler_output_to_proto",
    "structured_outputs_from_proto",
    "structured_outputs_to_proto",
    "token_logprobs_from_proto",
    "token_logprobs_to_proto",
]

# ---------------------------------------------------------------------------- SamplingParams
# Scalar fields with explicit presence: unset <-> the dataclass default. Collections (stop,
# stop_token_ids, logit_bias) are plain repeated/map fields. max_tokens: None <-> 0.
_SP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)
                if f.default is not dataclasses.MISSING}
_SP_SCALARS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens",
               "include_stop_str_in_output", "ignore_eos", "logprobs", "skip_special_tokens",
               "best_of", "use_beam_search", "length_penalty", "early_stopping")
_SP_UNLIMITED_MAX_TOKENS = 0


def sampling_params_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    kw = {}
    for name in _SP_SCALARS:
        v = getattr(sp, name)
        if v == _SP_DEFAULTS[name]:
            continue
        if v is None:
            if name == "max_tokens":
                kw[name] = _SP_UNLIMITED_MAX_TOKENS
            continue  # seed / logprobs None: leave unset
        kw[name] = v
    msg = common_pb2.SamplingParams(**kw)
    if sp.stop:
        msg.stop.extend(sp.stop)
    if sp.stop_token_ids:
        msg.stop_token_ids.extend(sp.stop_token_ids)
    for tok, bias in sp.logit_bias.items():
        msg.logit_bias[tok] = bias
    if sp.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_outputs_to_proto(sp.structured_outputs))
    return msg


def structured_outputs_to_proto(so: StructuredOutputsParams) -> common_pb2.StructuredOutputs:
    kind = so.kind
    if kind == "json":
        return common_pb2.StructuredOutputs(json=json.dumps(so.json))
    if kind == "json_object":
        return common_pb2.StructuredOutputs(json_object=True)
    if kind == "choice":
        return common_pb2.StructuredOutputs(choice=list(so.choice))
    return common_pb2.StructuredOutputs(**{kind: getattr(so, kind)})


def structured_outputs_from_proto(msg: common_pb2.StructuredOutputs) -> StructuredOutputsParams:
    kw = {name: getattr(msg, name) for name in ("json", "json_object", "regex", "grammar", "structural_tag")
          if msg.HasField(name)}
    if msg.choice:
        kw["choice"] = list(msg.choice)
    return StructuredOutputsParams(**kw)


def sampling_params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset fields take the dataclass defaults; validation errors are ValueErrors naming the field."""
    kw = {}
    for name in _SP_SCALARS:
        if msg.HasField(name):
            kw[name] = getattr(msg, name)
    if kw.get("max_tokens") == _SP_UNLIMITED_MAX_TOKENS:
        kw["max_tokens"] = None
    if msg.stop:
        kw["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kw["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        kw["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("structured_outputs"):
        try:
            kw["structured_outputs"] = structured_outputs_from_proto(msg.structured_outputs)
        except ValueError as e:
            raise ValueError(f"structured_outputs: {e}") from None
    return SamplingParams(**kw)


# ---------------------------------------------------------------------------- logprobs
def token_logprobs_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                                    top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)


def token_logprobs_from_proto(msg: common_pb2.TokenLogprobs) -> TokenLogprobs:
    if len(msg.top_token_ids) != len(msg.top_logprobs):
        raise ValueError(f"TokenLogprobs: {len(msg.top_token_ids)} top_token_ids but "
                         f"{len(msg.top_logprobs)} top_logprobs")
    return TokenLogprobs(token_id=msg.token_id, logprob=msg.logprob, rank=msg.rank,
                         top_token_ids=list(msg.top_token_ids), top_logprobs=list(msg.top_logprobs))


# ---------------------------------------------------------------------------- SchedulerOutput
def scheduler_output_to_proto(so: SchedulerOutput) -> executor_pb2.StepBatch:
    """Raises ValueError when so is inconsistent (a scheduled request without a
    num_scheduled_tokens entry, or an entry / spec tokens for a request that is not scheduled)."""
    nst, spec, masks = so.num_scheduled_tokens, so.scheduled_spec_decode_tokens, so.grammar_bitmasks
    NewPb, CachedPb = executor_pb2.NewRequestData, executor_pb2.CachedRequestData
    try:
        cached = []
        for r in so.scheduled_cached_reqs:
            m = CachedPb(req_id=r.req_id, num_computed_tokens=r.num_computed_tokens,
                         num_scheduled_tokens=nst[r.req_id])
            if r.new_block_ids:  # passing empty lists to the constructor is not free
                m.new_block_ids.extend(r.new_block_ids)
            if r.replaced_blocks:
                m.replaced_block_indices.extend([i for i, _ in r.replaced_blocks])
                m.replaced_block_ids.extend([b for _, b in r.replaced_blocks])
            if spec and r.req_id in spec:
                m.spec_token_ids.extend(spec[r.req_id])
            if masks and r.req_id in masks:
                m.grammar_bitmask = masks[r.req_id].astype("<i4", copy=False).tobytes()
            cached.append(m)
        new = []
        for r in so.scheduled_new_reqs:
            m = NewPb(req_id=r.req_id, prompt_token_ids=r.prompt_token_ids,
                      sampling_params=sampling_params_to_proto(r.sampling_params), block_ids=r.block_ids,
                      num_computed_tokens=r.num_computed_tokens, num_scheduled_tokens=nst[r.req_id])
            if r.output_token_ids:
                m.output_token_ids.extend(r.output_token_ids)
            if spec and r.req_id in spec:
                m.spec_token_ids.extend(spec[r.req_id])
            if r.trace_context:
                m.trace_context.update(r.trace_context)
            if masks and r.req_id in masks:
                m.grammar_bitmask = masks[r.req_id].astype("<i4", copy=False).tobytes()
            new.append(m)
    except KeyError as e:
        raise ValueError(f"step {so.step_id}: request {e.args[0]!r} is scheduled but has no "
                         f"num_scheduled_tokens entry") from None
    natural = [r.req_id for r in so.scheduled_cached_reqs] + [r.req_id for r in so.scheduled_new_reqs]
    if len(nst) != len(natural) or (spec and not spec.keys() <= nst.keys()):
        ghost = next(r for r in [*nst, *spec] if r not in set(natural))
        raise ValueError(f"step {so.step_id}: {ghost!r} has num_scheduled_tokens / spec tokens but is "
                         f"neither a new nor a cached request")
    msg = executor_pb2.StepBatch(step_id=so.step_id, scheduled_new_reqs=new, scheduled_cached_reqs=cached,
                                 total_num_scheduled_tokens=so.total_num_scheduled_tokens)
    if list(nst) != natural:
        index = {r: i for i, r in enumerate(natural)}
        msg.schedule_order.extend([index[r] for r in nst])
    if so.finished_req_ids:
        msg.finished_req_ids.extend(sorted(so.finished_req_ids))
    if so.block_copies:
        msg.block_copies.extend([executor_pb2.BlockCopy(src=a, dst=b) for a, b in so.block_copies])
    if so.bitmasks_deferred:
        msg.bitmasks_deferred = True
    return msg


def deferred_bitmasks_to_proto(step_id: int, bitmasks: dict[str, np.ndarray]) -> executor_pb2.StepBatch:
    """The message that brings a bitmasks_deferred step its grammar bitmasks."""
    msg = executor_pb2.StepBatch(step_id=step_id)
    msg.deferred_bitmasks.req_ids.extend(bitmasks)
    msg.deferred_bitmasks.bitmasks.extend(m.astype("<i4", copy=False).tobytes() for m in bitmasks.values())
    return msg


def deferred_bitmasks_from_proto(msg: executor_pb2.StepBatch, vocab_size: int) -> dict[str, np.ndarray]:
    d = msg.deferred_bitmasks
    if len(d.req_ids) != len(d.bitmasks):
        raise ValueError(f"deferred_bitmasks of step {msg.step_id}: {len(d.req_ids)} req_ids but {len(d.bitmasks)} bitmasks")
    out = {rid: _bitmask_from_bytes(rid, data) for rid, data in zip(d.req_ids, d.bitmasks)}
    _check_bitmask_words(out, vocab_size)
    return out


def _check_bitmask_words(bitmasks: dict[str, np.ndarray], vocab_size: int) -> None:
    words = (vocab_size + 31) // 32
    for rid, mask in bitmasks.items():
        if mask.shape != (words,):
            raise ValueError(f"grammar_bitmask of {rid!r} has {mask.size} words; the vocabulary needs {words}")


def scheduler_output_from_proto(msg: executor_pb2.StepBatch) -> SchedulerOutput:
    """Structural checks only (ids unique, counts positive, order a permutation, the total adds up);
    range checks against the model (vocab, KV blocks) are `check_step_against_info`'s job."""
    ids: list[str] = []
    counts: list[int] = []
    spec: dict[str, list[int]] = {}
    masks: dict[str, np.ndarray] = {}
    cached_reqs = []
    for r in msg.scheduled_cached_reqs:
        if r.num_computed_tokens < 0:
            raise ValueError(f"cached request {r.req_id!r}: negative num_computed_tokens")
        blocks = r.new_block_ids  # usually empty for a decode: skip the list() then
        if len(r.replaced_block_indices) != len(r.replaced_block_ids):
            raise ValueError(f"cached request {r.req_id!r}: replaced_block_indices and replaced_block_ids differ in length")
        cached_reqs.append(CachedRequestData(req_id=r.req_id, new_block_ids=list(blocks) if blocks else [],
                                             num_computed_tokens=r.num_computed_tokens,
                                             replaced_blocks=list(zip(r.replaced_block_indices, r.replaced_block_ids))
                                             if r.replaced_block_ids else []))
        ids.append(r.req_id)
        counts.append(r.num_scheduled_tokens)
        if r.spec_token_ids:
            spec[r.req_id] = list(r.spec_token_ids)
        if r.grammar_bitmask:
            masks[r.req_id] = _bitmask_from_bytes(r.req_id, r.grammar_bitmask)
    new_reqs = []
    for r in msg.scheduled_new_reqs:
        if not r.prompt_token_ids:
            raise ValueError(f"new request {r.req_id!r}: empty prompt_token_ids")
        if r.num_computed_tokens < 0:
            raise ValueError(f"new request {r.req_id!r}: negative num_computed_tokens")
        try:
            sp = sampling_params_from_proto(r.sampling_params)
        except (ValueError, TypeError) as e:
            raise ValueError(f"new request {r.req_id!r}: sampling_params: {e}") from None
        new_reqs.append(NewRequestData(
            req_id=r.req_id, prompt_token_ids=list(r.prompt_token_ids), sampling_params=sp,
            block_ids=list(r.block_ids), num_computed_tokens=r.num_computed_tokens,
            output_token_ids=list(r.output_token_ids),
            trace_context=dict(r.trace_context) if r.trace_context else None))
        ids.append(r.req_id)
        counts.append(r.num_scheduled_tokens)
        if r.spec_token_ids:
            spec[r.req_id] = list(r.spec_token_ids)
        if r.grammar_bitmask:
            masks[r.req_id] = _bitmask_from_bytes(r.req_id, r.grammar_bitmask)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(r for r in ids if r in seen or seen.add(r))
        raise ValueError(f"request {dup!r} scheduled twice in step {msg.step_id}")
    if "" in ids:
        raise ValueError("a scheduled request has an empty req_id")
    bad = next((i for i, n in enumerate(counts) if n <= 0), None)
    if bad is not None:
        raise ValueError(f"num_scheduled_tokens of {ids[bad]!r} must be >= 1, got {counts[bad]}")
    order = list(msg.schedule_order)
    if order:
        if sorted(order) != list(range(len(ids))):
            raise ValueError(f"schedule_order must be a permutation of 0..{len(ids) - 1}")
        num_sched = {ids[i]: counts[i] for i in order}
    else:
        num_sched = dict(zip(ids, counts))
    total = sum(counts)
    if msg.total_num_scheduled_tokens != total:
        raise ValueError(f"total_num_scheduled_tokens is {msg.total_num_scheduled_tokens}, "
                         f"but num_scheduled_tokens sum to {total}")
    for c in msg.block_copies:
        if c.src < 0 or c.dst < 0:
            raise ValueError(f"block_copies: negative block id in ({c.src}, {c.dst})")
    return SchedulerOutput(
        step_id=msg.step_id,
        scheduled_new_reqs=new_reqs,
        scheduled_cached_reqs=cached_reqs,
        num_scheduled_tokens=num_sched,
        total_num_scheduled_tokens=total,
        scheduled_spec_decode_tokens=spec,
        finished_req_ids=set(msg.finished_req_ids),
        block_copies=[(c.src, c.dst) for c in msg.block_copies],
        grammar_req_ids=list(masks),
        grammar_bitmasks=masks,
        bitmasks_deferred=msg.bitmasks_deferred,
    )


def _bitmask_from_bytes(req_id: str, data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise ValueError(f"request {req_id!r}: grammar_bitmask is {len(data)} bytes, not whole int32 words")
    return np.frombuffer(data, dtype="<i4").astype(np.int32)


def check_step_against_info(so: SchedulerOutput, info: ExecutorInfo) -> None:
    """Range checks a GPU would otherwise turn into a dead CUDA context (an out-of-range embedding
    gather or KV write): token ids within the vocabulary, block ids within the KV cache, positions
    within max_model_len. Raises ValueError."""
    vocab, nblocks, max_len = info.vocab_size, info.num_kv_blocks, info.max_model_len

    def check_tokens(what: str, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary (size {vocab})")

    def check_blocks(what: str, ids) -> None:
        if ids and (min(ids) < 0 or max(ids) >= nblocks):
            bad = next(b for b in ids if not 0 <= b < nblocks)
            raise ValueError(f"{what}: block id {bad} is outside the KV cache ({nblocks} blocks)")

    for r in so.scheduled_new_reqs:
        check_tokens(f"new request {r.req_id!r} prompt_token_ids", r.prompt_token_ids)
        check_tokens(f"new request {r.req_id!r} output_token_ids", r.output_token_ids)
        check_blocks(f"new request {r.req_id!r} block_ids", r.block_ids)
        n = len(r.prompt_token_ids) + len(r.output_token_ids)
        if n > max_len:
            raise ValueError(f"new request {r.req_id!r}: {n} tokens exceed max_model_len {max_len}")
        if r.num_computed_tokens > n:
            raise ValueError(f"new request {r.req_id!r}: num_computed_tokens {r.num_computed_tokens} > "
                             f"its {n} tokens")
        try:
            r.sampling_params.validate_vocab(vocab)
        except ValueError as e:
            raise ValueError(f"new request {r.req_id!r}: sampling_params: {e}") from None
    for r in so.scheduled_cached_reqs:
        check_blocks(f"cached request {r.req_id!r} new_block_ids", r.new_block_ids)
        check_blocks(f"cached request {r.req_id!r} replaced_blocks", [b for _, b in r.replaced_blocks])
    _check_bitmask_words(so.grammar_bitmasks, vocab)
    for rid, toks in so.scheduled_spec_decode_tokens.items():
        check_tokens(f"scheduled_spec_decode_tokens[{rid!r}]", toks)
    check_blocks("block_copies", [b for pair in so.block_copies for b in pair])
    if so.total_num_scheduled_tokens and max(so.num_scheduled_tokens.values()) > max_len:
        rid = max(so.num_scheduled_tokens, key=so.num_scheduled_tokens.__getitem__)
        raise ValueError(f"num_scheduled_tokens[{rid!r}] exceeds max_model_len {max_len}")


# ---------------------------------------------------------------------------- ModelRunnerOutput
def model_runner_output_to_proto(out: ModelRunnerOutput) -> executor_pb2.StepResult:
    n = len(out.req_ids)
    if len(out.sampled_token_ids) != n or len(out.logprobs) not in (0, n):
        raise ValueError(f"ModelRunnerOutput step {out.step_id}: {n} req_ids, {len(out.sampled_token_ids)} "
                         f"sampled_token_ids, {len(out.logprobs)} logprobs")
    lps = out.logprobs or [None] * n
    outputs = []
    for rid, toks, lp in zip(out.req_ids, out.sampled_token_ids, lps):
        m = executor_pb2.SampledTokens(req_id=rid, token_ids=toks)
        if lp is not None:
            m.logprobs.SetInParent()
            m.logprobs.entries.extend([token_logprobs_to_proto(x) for x in lp])
        outputs.append(m)
    msg = executor_pb2.StepResult(step_id=out.step_id, outputs=outputs, execute_time_s=out.execute_time_s)
    if out.spec_token_ids:
        if len(out.spec_token_ids) != n:
            raise ValueError(f"ModelRunnerOutput step {out.step_id}: {n} req_ids, {len(out.spec_token_ids)} "
                             "spec_token_ids")
        msg.spec_token_ids.extend([executor_pb2.SpecTokens(token_ids=d) for d in out.spec_token_ids])
    return msg


def model_runner_output_from_proto(msg: executor_pb2.StepResult) -> ModelRunnerOutput:
    req_ids, sampled, logprobs = [], [], []
    for o in msg.outputs:
        req_ids.append(o.req_id)
        sampled.append(list(o.token_ids))
        if o.HasField("logprobs"):
            logprobs.append([token_logprobs_from_proto(x) for x in o.logprobs.entries])
        else:
            logprobs.append(None)
    if msg.spec_token_ids and len(msg.spec_token_ids) != len(req_ids):
        raise ValueError(f"StepResult {msg.step_id}: {len(req_ids)} outputs, {len(msg.spec_token_ids)} spec_token_ids")
    return ModelRunnerOutput(step_id=msg.step_id, req_ids=req_ids, sampled_token_ids=sampled,
                             logprobs=logprobs, execute_time_s=msg.execute_time_s,
                             spec_token_ids=[list(d.token_ids) for d in msg.spec_token_ids])


# ---------------------------------------------------------------------------- ExecutorInfo
_INFO_FIELDS = [f.name for f in dataclasses.fields(ExecutorInfo)]


def executor_info_to_proto(info: ExecutorInfo) -> executor_pb2.ExecutorInfo:
    return executor_pb2.ExecutorInfo(**{k: getattr(info, k) for k in _INFO_FIELDS})


def executor_info_from_proto(msg: executor_pb2.ExecutorInfo) -> ExecutorInfo:
    kw = {k: getattr(msg, k) for k in _INFO_FIELDS}
    kw["eos_token_ids"] = list(msg.eos_token_ids)
    return ExecutorInfo(**kw)
