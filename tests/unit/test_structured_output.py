"""Structured output in the engine (issue 15), real SmolLM2 on CPU: the params, the compiler's
errors and cache, constrained greedy generation (JSON schema, choice, regex, grammar), identical
outputs with async scheduling on and off, under preemption (few KV blocks) and across an executor
failure + replay (the grammar state lives in the scheduler and survives), free neighbours
unchanged, the step contract's bitmask through the protobuf converter, and tool-call parsing."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams
from engine_core.structured_output.params import StructuredOutputsParams as P
from engine_core.tool_calls import (
    ToolChoice,
    messages_for_template,
    parse_tool_calls,
    parse_tool_choice,
    tool_call_constraint,
    validate_tools,
)
from tests.unit.executor_faults import FailOnce

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 1, "maximum": 99},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "age", "tags"]}
PROMPTS = [f"<|im_start|>user\nDescribe person {i} as JSON.<|im_end|>\n<|im_start|>assistant\n" for i in range(5)]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 12 usable blocks of 16 tokens for five requests of ~60 tokens: preemption happens.
    return LLM(max_model_len=128, num_gpu_blocks_override=13, max_num_batched_tokens=64, seed=0)


def _gen(llm: LLM, params, async_on: bool = True):
    core = llm.engine.core
    core.max_in_flight = 2 if async_on else 1
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    bm = core.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks  # nothing leaked
    assert not core.scheduler.has_grammar_requests
    return [o.outputs[0] for o in outs]


# ---------------------------------------------------------------------------- params / compiler
def test_params_take_exactly_one_kind_and_hash_canonically():
    with pytest.raises(ValueError, match="exactly one"):
        P()
    with pytest.raises(ValueError, match="exactly one"):
        P(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        P(json="{nope")
    assert P(json='{"b": 1, "a": 2}').key == P(json={"a": 2, "b": 1}).key
    assert P(regex="a+").key != P(grammar="a+").key
    assert SamplingParams(structured_outputs={"choice": ["x", "y"]}).structured_outputs == P(choice=("x", "y"))
    with pytest.raises(ValueError, match="unknown field"):
        P.from_dict({"jsn": {}})


def test_compiler_rejects_bad_specs_and_caches(llm):
    comp = llm.engine.core.grammar_compiler
    for bad, needle in [(P(json={"type": "bogus"}), "bogus"), (P(regex="(("), "regex"),
                        (P(grammar="root ::= nothing_here"), "nothing_here")]:
        with pytest.raises(ValueError, match=needle):
            comp.compile(bad)
    hits = comp.stats.cache_hits
    a = comp.compile(P(json=SCHEMA))
    b = comp.compile(P(json=json.dumps(SCHEMA)))
    assert a is b and comp.stats.cache_hits == hits + 1
    with pytest.raises(ValueError, match="bogus"):
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs=P(json={"type": "bogus"})), use_tqdm=False)


# ---------------------------------------------------------------------------- generation
def test_json_schema_valid_and_identical_async_sync_with_preemption(llm):
    sp = SamplingParams(temperature=0, max_tokens=80, structured_outputs=P(json=SCHEMA))
    pre = llm.engine.core.scheduler.num_preemptions
    got = _gen(llm, sp, async_on=True)
    assert llm.engine.core.scheduler.num_preemptions > pre  # the small KV cache forced recompute
    for o in got:
        jsonschema.validate(json.loads(o.text), SCHEMA)
        assert o.finish_reason == "stop"
    assert [o.token_ids for o in _gen(llm, sp, async_on=False)] == [o.token_ids for o in got]


def test_choice_regex_grammar_and_sampled(llm):
    outs = _gen(llm, SamplingParams(temperature=0, max_tokens=10, structured_outputs=P(choice=["cat", "dog"])))
    assert all(o.text in ("cat", "dog") for o in outs)
    outs = _gen(llm, SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_outputs=P(regex=r"[0-9]{4}")))
    assert all(len(o.text) == 4 and o.text.isdigit() for o in outs)
    g = 'root ::= "ab" [0-9] ("x" | "y")'
    outs = _gen(llm, SamplingParams(temperature=0.7, seed=1, max_tokens=12, structured_outputs=P(grammar=g)))
    assert all(len(o.text) == 4 and o.text.startswith("ab") and o.text[-1] in "xy" for o in outs)


def test_free_neighbours_unchanged(llm):
    free = SamplingParams(temperature=0, max_tokens=16)
    alone = llm.generate(PROMPTS, free, use_tqdm=False)
    mixed = llm.generate(PROMPTS + PROMPTS, [free] * 5 + [SamplingParams(
        temperature=0, max_tokens=40, structured_outputs=P(json=SCHEMA))] * 5, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in mixed[:5]]


def test_grammar_survives_executor_failure_and_replay(llm):
    sp = SamplingParams(temperature=0, max_tokens=80, structured_outputs=P(json=SCHEMA))
    want = [o.token_ids for o in _gen(llm, sp)]
    core = llm.engine.core
    inner, restarts = core.executor, core.counters.executor_restarts
    core.executor = FailOnce(inner, at=12)  # mid-generation: tokens are out, the JSON is not finished
    try:
        got = _gen(llm, sp)
    finally:
        core.executor = inner
    assert core.counters.executor_restarts == restarts + 1
    assert [o.token_ids for o in got] == want


# ---------------------------------------------------------------------------- the step contract
def test_bitmask_travels_through_the_step_proto(llm):
    from services import convert

    core = llm.engine.core
    req = core.add_request("bm", [1, 2, 3], SamplingParams(structured_outputs=P(choice=["yes"])))
    so = core.scheduler.schedule()
    assert so.grammar_req_ids == ["bm"] and not so.grammar_bitmasks  # EngineCore fills them
    so.grammar_bitmasks = core.scheduler.fill_grammar_bitmasks(so.grammar_req_ids)
    mask = so.grammar_bitmasks["bm"]
    assert mask.dtype == np.int32 and mask.shape == ((core.info.vocab_size + 31) // 32,)
    back = convert.scheduler_output_from_proto(convert.scheduler_output_to_proto(so))
    np.testing.assert_array_equal(back.grammar_bitmasks["bm"], mask)
    convert.check_step_against_info(back, core.info)
    back.grammar_bitmasks["bm"] = mask[:-1]
    with pytest.raises(ValueError, match="words"):
        convert.check_step_against_info(back, core.info)
    sp = convert.sampling_params_from_proto(convert.sampling_params_to_proto(req.sampling_params))
    assert sp.structured_outputs == P(choice=["yes"])
    core.executor.execute(so)  # the executor samples under the mask: only "yes"'s first token is allowed
    core.abort_requests(["bm"])
    core.executor.execute(core.scheduler.schedule())  # drops "bm"
    while core.has_unfinished_requests():
        core.step()


# ---------------------------------------------------------------------------- tool calls
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
    {"type": "function", "function": {"name": "g"}}]


def test_tool_choice_and_constraints():
    fns = validate_tools(TOOLS)
    assert parse_tool_choice(None, fns) == ToolChoice("auto")
    assert parse_tool_choice(None, None) == ToolChoice("none")
    assert parse_tool_choice({"type": "function", "function": {"name": "g"}}, fns) == ToolChoice("named", "g")
    for bad in ("sometimes", {"type": "function", "function": {"name": "h"}}, 3):
        with pytest.raises(ValueError):
            parse_tool_choice(bad, fns)
    with pytest.raises(ValueError, match="unique"):
        validate_tools(TOOLS + TOOLS)
    req = tool_call_constraint(ToolChoice("required"), fns).json
    jsonschema.validate([{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}], req)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], req)
    assert tool_call_constraint(ToolChoice("named", "f"), fns).json == fns[0]["parameters"]
    assert tool_call_constraint(ToolChoice("auto"), fns) is None


def test_parse_tool_calls_each_mode():
    content, calls = parse_tool_calls('{"x": 3}', ToolChoice("named", "f"))
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 3})]
    _, calls = parse_tool_calls('[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]',
                                ToolChoice("required"))
    assert [c.name for c in calls] == ["f", "g"]
    text = 'Sure.<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
    content, calls = parse_tool_calls(text, ToolChoice("auto"))
    assert content == "Sure." and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 2}
    assert parse_tool_calls("no calls here", ToolChoice("auto")) == ("no calls here", [])


def test_tool_call_stream_holds_back_tag_prefixes():
    from gateway.tool_call_stream import ToolCallStream

    ts = ToolCallStream(ToolChoice("auto"))
    pieces = ["Hi <", "tool", "_call>", '{"name": "f", "arguments": {"x": 1}}', "</tool_call>"]
    deltas = [d for p in pieces for d in ts.feed(p)] + ts.finish()
    assert deltas[0] == {"content": "Hi "}
    assert ts.has_calls and deltas[-1]["tool_calls"][0]["function"]["name"] == "f"
    ts = ToolCallStream(ToolChoice("named", "f"))
    deltas = ts.feed('{"x"') + ts.feed(": 1}") + ts.finish()
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"x": 1}'


def test_templates_without_tools_get_a_system_prompt_and_text_calls():
    fns = validate_tools(TOOLS)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    out, kw = messages_for_template(msgs, fns, "{{ messages }}")
    assert kw == {} and out[0]["role"] == "system" and '"name": "f"' in out[0]["content"]
    assert "<tool_call>" in out[2]["content"] and '"x": 1' in out[2]["content"]
    out, kw = messages_for_template(msgs, fns, "{% for t in tools %}{% endfor %}")
    assert out is msgs and kw["tools"][0]["function"]["name"] == "f"
