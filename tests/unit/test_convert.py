"""Engine dataclasses <-> proto messages round-trip exactly (services/convert.py)."""
from __future__ import annotations

import pytest

from engine_core.executor.base import ExecutorInfo
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from services import convert
from services.gen.pagedserve.v1 import common_pb2, executor_pb2


def wire(msg):
    """Serialize and parse again, as gRPC does."""
    return type(msg).FromString(msg.SerializeToString())


def rt_sp(sp: SamplingParams) -> SamplingParams:
    return convert.sampling_params_from_proto(wire(convert.sampling_params_to_proto(sp)))


# ---------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("sp", [
    SamplingParams(),
    SamplingParams(temperature=0.0, max_tokens=None),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=1234, presence_penalty=0.5,
                   frequency_penalty=-0.25, repetition_penalty=1.1, max_tokens=100, min_tokens=3,
                   stop=["\n\n", "END"], stop_token_ids=[2, 7], include_stop_str_in_output=True,
                   ignore_eos=True, logprobs=5, logit_bias={42: -100.0, 7: 2.5}, skip_special_tokens=False),
    SamplingParams(seed=0),          # seed 0 is not "no seed"
    SamplingParams(seed=-5),
    SamplingParams(seed=2**63 - 1),
    SamplingParams(logprobs=0),      # 0: only the sampled token, not None
    SamplingParams(n=3, temperature=1.3),
    SamplingParams(temperature=0.1 + 0.2),  # not float32-exact: doubles round-trip
], ids=lambda sp: repr(sp)[:60])
def test_sampling_params_round_trip(sp):
    assert rt_sp(sp) == sp


def test_sampling_params_presence():
    assert rt_sp(SamplingParams(seed=None)).seed is None
    assert rt_sp(SamplingParams(seed=0)).seed == 0
    assert rt_sp(SamplingParams(logprobs=None)).logprobs is None
    assert rt_sp(SamplingParams(logprobs=0)).logprobs == 0
    assert rt_sp(SamplingParams(max_tokens=None)).max_tokens is None
    # Defaults are sent as nothing at all.
    assert convert.sampling_params_to_proto(SamplingParams()).ByteSize() == 0


def test_sampling_params_unset_fields_are_defaults():
    sp = convert.sampling_params_from_proto(common_pb2.SamplingParams(temperature=0.0))
    assert sp == SamplingParams(temperature=0.0)
    assert sp.max_tokens == 16 and sp.top_p == 1.0 and sp.repetition_penalty == 1.0 and sp.skip_special_tokens


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("n", 0), ("max_tokens", -3),
                                         ("logprobs", 21), ("repetition_penalty", 0.0)])
def test_sampling_params_invalid_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        convert.sampling_params_from_proto(common_pb2.SamplingParams(**{field: value}))


def test_seed_out_of_int64_range():
    with pytest.raises(ValueError):
        convert.sampling_params_to_proto(SamplingParams(seed=2**64))


# ---------------------------------------------------------------------------- SchedulerOutput
def make_so() -> SchedulerOutput:
    return SchedulerOutput(
        step_id=7,
        scheduled_new_reqs=[
            NewRequestData("new-a", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0), [3, 4], 0),
            NewRequestData("replayed", [9, 8, 7], SamplingParams(seed=11, logprobs=2), [5], 2,
                           output_token_ids=[100, 101]),
        ],
        scheduled_cached_reqs=[
            CachedRequestData("run-1", [], 40),
            CachedRequestData("run-2", [17], 63),
            CachedRequestData("spec", [], 10),
        ],
        # Not in new+cached order on purpose: the executor's batch order follows this dict.
        num_scheduled_tokens={"run-1": 1, "spec": 3, "new-a": 5, "run-2": 1, "replayed": 3},
        total_num_scheduled_tokens=13,
        scheduled_spec_decode_tokens={"spec": [55, 66]},
        finished_req_ids={"done-1", "aborted-2"},
        block_copies=[(3, 9), (4, 10)],
    )


def test_scheduler_output_round_trip():
    so = make_so()
    back = convert.scheduler_output_from_proto(wire(convert.scheduler_output_to_proto(so)))
    assert back == so
    assert list(back.num_scheduled_tokens) == list(so.num_scheduled_tokens)  # order kept
    assert back.scheduled_new_reqs[1].output_token_ids == [100, 101]
    assert back.scheduled_new_reqs[1].sampling_params.seed == 11
    assert back.scheduled_new_reqs[0].sampling_params.seed is None


def test_empty_scheduler_output_round_trip():
    so = SchedulerOutput(step_id=0)
    back = convert.scheduler_output_from_proto(wire(convert.scheduler_output_to_proto(so)))
    assert back == so and back.is_empty
    so = SchedulerOutput(step_id=3, finished_req_ids={"x"})  # only forgets
    assert convert.scheduler_output_from_proto(convert.scheduler_output_to_proto(so)) == so


def test_decode_step_is_small():
    """DESIGN.md §2: a decode step for 256 running requests is a few KB."""
    ids = [f"chatcmpl-{i:032x}" for i in range(256)]
    so = SchedulerOutput(step_id=12345, scheduled_cached_reqs=[CachedRequestData(r, [], 700) for r in ids],
                         num_scheduled_tokens={r: 1 for r in ids}, total_num_scheduled_tokens=256)
    size = convert.scheduler_output_to_proto(so).ByteSize()
    assert size < 256 * 55, size  # ~50 bytes per request, 41 of them the id


def _mutated(fn):
    msg = convert.scheduler_output_to_proto(make_so())
    fn(msg)
    return wire(msg)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m.scheduled_cached_reqs[0], "num_scheduled_tokens", 0), "must be >= 1"),
    (lambda m: setattr(m, "total_num_scheduled_tokens", 99), "total_num_scheduled_tokens"),
    (lambda m: m.schedule_order.append(0), "permutation"),
    (lambda m: setattr(m.scheduled_cached_reqs[1], "req_id", "run-1"), "scheduled twice"),
    (lambda m: setattr(m.scheduled_cached_reqs[1], "req_id", ""), "empty req_id"),
    (lambda m: m.scheduled_new_reqs[0].ClearField("prompt_token_ids"), "empty prompt"),
    (lambda m: setattr(m.scheduled_new_reqs[0].sampling_params, "temperature", -1.0), "temperature"),
    (lambda m: setattr(m.scheduled_cached_reqs[0], "num_computed_tokens", -1), "negative"),
    (lambda m: m.block_copies.add(src=-1, dst=2), "negative block id"),
])
def test_malformed_batches_are_value_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        convert.scheduler_output_from_proto(_mutated(mutate))


@pytest.mark.parametrize("mutate,match", [
    (lambda so: so.num_scheduled_tokens.pop("run-2"), "'run-2' is scheduled but has no num_scheduled_tokens"),
    (lambda so: so.num_scheduled_tokens.update(ghost=1), "'ghost' .* neither a new nor a cached"),
    (lambda so: so.scheduled_spec_decode_tokens.update(ghost=[1]), "'ghost' .* neither a new nor a cached"),
])
def test_inconsistent_scheduler_output_is_refused_by_the_sender(mutate, match):
    so = make_so()
    mutate(so)
    with pytest.raises(ValueError, match=match):
        convert.scheduler_output_to_proto(so)


def test_natural_order_needs_no_schedule_order():
    """The scheduler's own order (running first, then new) costs nothing on the wire."""
    so = make_so()
    so.num_scheduled_tokens = {r: so.num_scheduled_tokens[r] for r in ["run-1", "run-2", "spec", "new-a", "replayed"]}
    msg = convert.scheduler_output_to_proto(so)
    assert not msg.schedule_order
    assert convert.scheduler_output_from_proto(wire(msg)) == so
    assert list(convert.scheduler_output_from_proto(wire(convert.scheduler_output_to_proto(make_so())))
                .num_scheduled_tokens) == ["run-1", "spec", "new-a", "run-2", "replayed"]


INFO = ExecutorInfo(model_name="m", architecture="LlamaForCausalLM", vocab_size=1000, max_model_len=64,
                    num_kv_blocks=20, block_size=16, dtype="float32", device="cpu", num_layers=2,
                    num_kv_heads=1, head_dim=8, kv_cache_bytes=123456, eos_token_ids=[2, 3])


def test_check_step_against_info():
    convert.check_step_against_info(make_so(), INFO)
    for mutate, match in [
        (lambda so: so.scheduled_new_reqs[0].prompt_token_ids.append(1000), "outside the vocabulary"),
        (lambda so: so.scheduled_new_reqs[1].output_token_ids.append(-1), "outside the vocabulary"),
        (lambda so: so.scheduled_new_reqs[0].block_ids.append(20), "outside the KV cache"),
        (lambda so: so.scheduled_cached_reqs[1].new_block_ids.append(99), "outside the KV cache"),
        (lambda so: so.block_copies.append((1, 20)), "outside the KV cache"),
        (lambda so: so.scheduled_spec_decode_tokens["spec"].append(5000), "outside the vocabulary"),
        (lambda so: so.scheduled_new_reqs[0].prompt_token_ids.extend([1] * 64), "max_model_len"),
        (lambda so: setattr(so.scheduled_new_reqs[0], "num_computed_tokens", 6), "num_computed_tokens"),
        (lambda so: so.scheduled_new_reqs[0].sampling_params.stop_token_ids.append(1000), "stop_token_ids"),
    ]:
        so = make_so()
        mutate(so)
        with pytest.raises(ValueError, match=match):
            convert.check_step_against_info(so, INFO)


# ---------------------------------------------------------------------------- ModelRunnerOutput
def test_model_runner_output_round_trip():
    lp = [TokenLogprobs(token_id=5, logprob=-0.5, rank=1, top_token_ids=[5, 9], top_logprobs=[-0.5, -1.25])]
    out = ModelRunnerOutput(
        step_id=7,
        req_ids=["a", "b", "prefilling", "spec", "with-empty-logprobs"],
        sampled_token_ids=[[5], [6], [], [1, 2, 3], []],
        logprobs=[lp, None, None, None, []],
        execute_time_s=0.0123,
    )
    back = convert.model_runner_output_from_proto(wire(convert.model_runner_output_to_proto(out)))
    assert back == out
    assert back.logprobs[1] is None and back.logprobs[4] == []  # None vs requested-but-empty
    assert back.by_request()["spec"] == ([1, 2, 3], None)


def test_token_logprobs_round_trip():
    lp = TokenLogprobs(token_id=3, logprob=-2.0, rank=4)  # logprobs=0: no alternatives
    assert convert.token_logprobs_from_proto(wire(convert.token_logprobs_to_proto(lp))) == lp
    lp = TokenLogprobs(token_id=3, logprob=-0.125, rank=1, top_token_ids=[3, 1, 2],
                       top_logprobs=[-0.125, -3.5, -4.0])
    assert convert.token_logprobs_from_proto(wire(convert.token_logprobs_to_proto(lp))) == lp


def test_model_runner_output_mismatched_lengths():
    with pytest.raises(ValueError):
        convert.model_runner_output_to_proto(ModelRunnerOutput(step_id=1, req_ids=["a", "b"],
                                                               sampled_token_ids=[[1]], logprobs=[None]))


def test_empty_model_runner_output():
    out = ModelRunnerOutput(step_id=4)
    assert convert.model_runner_output_from_proto(wire(convert.model_runner_output_to_proto(out))) == out


# ---------------------------------------------------------------------------- ExecutorInfo
def test_executor_info_round_trip():
    back = convert.executor_info_from_proto(wire(convert.executor_info_to_proto(INFO)))
    assert back == INFO
    big = ExecutorInfo(**{**INFO.__dict__, "kv_cache_bytes": 70 * 2**30, "eos_token_ids": []})
    assert convert.executor_info_from_proto(wire(convert.executor_info_to_proto(big))) == big


def test_step_result_proto_shape():
    """StepResult carries one SampledTokens per request (the proto mirror of by_request())."""
    msg = convert.model_runner_output_to_proto(ModelRunnerOutput(step_id=1, req_ids=["a"], sampled_token_ids=[[4]],
                                                                 logprobs=[None]))
    assert isinstance(msg, executor_pb2.StepResult)
    assert [(o.req_id, list(o.token_ids), o.HasField("logprobs")) for o in msg.outputs] == [("a", [4], False)]


# ---------------------------------------------------------------------------- the mirror stays complete
def _names(dc) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(dc)}


@pytest.mark.parametrize("dc,msg,extra", [
    (SamplingParams, common_pb2.SamplingParams, set()),
    (TokenLogprobs, common_pb2.TokenLogprobs, set()),
    (ExecutorInfo, executor_pb2.ExecutorInfo, set()),
    (NewRequestData, executor_pb2.NewRequestData, {"num_scheduled_tokens", "spec_token_ids", "grammar_bitmask"}),
    # replaced_blocks [(index, block id)] travels as two parallel repeated fields
    (CachedRequestData, executor_pb2.CachedRequestData,
     {"num_scheduled_tokens", "spec_token_ids", "grammar_bitmask", "replaced_block_indices", "replaced_block_ids",
      "-replaced_blocks"}),
])
def test_every_dataclass_field_has_a_proto_field(dc, msg, extra):
    """A field added to an engine dataclass must be added to the proto (and services/convert.py).
    extra: proto-only fields; "-name": a dataclass field carried under other proto names."""
    renamed = {e[1:] for e in extra if e.startswith("-")}
    proto_only = {e for e in extra if not e.startswith("-")}
    assert set(msg.DESCRIPTOR.fields_by_name) == (_names(dc) - renamed) | proto_only


def test_spec_decode_fields_round_trip():
    """Speculative decoding: per-request drafts in StepResult, k and lookahead in ExecutorInfo."""
    out = ModelRunnerOutput(step_id=3, req_ids=["a", "b"], sampled_token_ids=[[1, 2, 3], [4]],
                            logprobs=[None, None], spec_token_ids=[[5, 6], []])
    back = convert.model_runner_output_from_proto(convert.model_runner_output_to_proto(out))
    assert back.spec_token_ids == [[5, 6], []] and back.sampled_token_ids == [[1, 2, 3], [4]]
    plain = ModelRunnerOutput(step_id=3, req_ids=["a"], sampled_token_ids=[[1]], logprobs=[None])
    assert convert.model_runner_output_from_proto(convert.model_runner_output_to_proto(plain)).spec_token_ids == []
