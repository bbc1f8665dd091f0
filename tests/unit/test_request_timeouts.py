"""Per-request timeouts in EngineCore (model-free executor, fake clock: asserted in steps, no sleeps):
deadline from arrival (queue time counts), abort with the tokens so far, blocks freed at once, the
server default and its per-request override, the counters; and the request-field validation."""
from __future__ import annotations

import math

import pytest

from engine_core.config import EngineConfig
from engine_core.engine_core import EngineCore
from engine_core.sampling_params import SamplingParams
from tests.integration.fake_executor import FakeExecutor


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_core(**kw) -> tuple[EngineCore, Clock]:
    cfg = EngineConfig(device="cpu", load_format="dummy", async_scheduling=False, **kw)
    core = EngineCore(cfg, FakeExecutor(num_blocks=64, block_size=4, max_model_len=256))
    clock = Clock()
    core.clock = clock
    return core, clock


def params(max_tokens: int = 50) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def run_steps(core: EngineCore, n: int) -> list:
    out = []
    for _ in range(n):
        out += core.step()
    return out


def test_running_request_times_out_with_its_tokens_and_frees_blocks():
    core, clock = make_core()
    core.add_request("a", [1, 2, 3], params(), timeout=2.0)
    core.add_request("b", [4, 5, 6], params(max_tokens=100))  # no timeout
    got = run_steps(core, 3)
    a_tokens = [t for d in got if d.request_id == "a" for t in d.new_token_ids]
    assert len(a_tokens) == 3
    clock.t += 1.9
    assert not any(d.finished for d in run_steps(core, 1))  # not yet (4 tokens now)
    clock.t += 0.2
    deltas = core.step()
    (final,) = [d for d in deltas if d.request_id == "a" and d.finished]
    assert final.finish_reason == "abort" and final.new_token_ids == []
    assert final.num_output_tokens == 4  # the tokens it had are kept (already streamed)
    assert "timed out" in final.error_message and "timeout 2s" in final.error_message
    assert "a" not in core.scheduler.requests
    assert core.scheduler.block_manager.get_block_ids("a") == []
    assert core.counters.requests_timed_out == 1
    assert core.scheduler.finished_by_reason == {"abort": 1}
    so = core.scheduler.schedule()
    assert "a" in so.finished_req_ids or "a" not in core.executor.requests  # the executor drops it
    assert "b" in core.scheduler.requests  # the other request is untouched


def test_queue_time_counts():
    core, clock = make_core(max_num_seqs=1)
    core.add_request("first", [1, 2], params(max_tokens=100))
    core.add_request("queued", [3, 4], params(), timeout=1.0)
    run_steps(core, 2)
    assert [r.request_id for r in core.scheduler.waiting] == ["queued"]
    clock.t += 1.0  # deadline is arrival + 1.0: due now
    (d,) = [d for d in core.step() if d.request_id == "queued"]
    assert d.finish_reason == "abort" and d.num_output_tokens == 0 and "timed out" in d.error_message
    assert not core.scheduler.waiting and core.counters.requests_timed_out == 1


def test_server_default_and_per_request_override():
    core, clock = make_core(request_timeout=5.0)
    core.add_request("default", [1], params(max_tokens=100))
    core.add_request("off", [2], params(max_tokens=100), timeout=0)  # 0: no timeout for this one
    core.add_request("longer", [3], params(max_tokens=100), timeout=50.0)
    assert core.scheduler.requests["default"].deadline == pytest.approx(clock.t + 5.0)
    assert core.scheduler.requests["off"].deadline is None
    run_steps(core, 2)
    clock.t += 10
    finished = {d.request_id for d in core.step() if d.finished}
    assert finished == {"default"}
    clock.t += 100
    finished = {d.request_id for d in core.step() if d.finished}
    assert finished == {"longer"}
    assert set(core.scheduler.requests) == {"off"} and core.counters.requests_timed_out == 2


def test_finished_in_time_is_not_a_timeout_and_the_heap_stays_small():
    core, clock = make_core()
    for i in range(200):
        core.add_request(f"r{i}", [1 + i % 50], params(max_tokens=1), timeout=60.0)
    while core.has_unfinished_requests():
        core.step()
    assert core.scheduler.finished_by_reason == {"length": 200}
    clock.t += 100
    core.add_request("late", [1], params(max_tokens=1), timeout=60.0)
    core.step()
    assert core.counters.requests_timed_out == 0
    assert len(core.deadlines) <= 2 * core.scheduler.num_unfinished + 64


def test_an_aborted_id_reused_keeps_only_its_own_deadline():
    core, clock = make_core()
    core.add_request("x", [1], params(), timeout=1.0)
    core.abort_requests(["x"])
    core.step()
    core.add_request("x", [1], params(max_tokens=100))  # same id, no timeout
    clock.t += 5
    assert not any(d.finished for d in run_steps(core, 2))
    assert core.counters.requests_timed_out == 0


@pytest.mark.parametrize("timeout", [-1, -0.5, math.nan, math.inf, True, "3"])
def test_bad_timeouts_are_refused_naming_the_field(timeout):
    core, _ = make_core()
    with pytest.raises(ValueError, match=r"^timeout"):
        core.add_request("a", [1], params(), timeout=timeout)
    assert not core.scheduler.requests


@pytest.mark.parametrize("priority", [1.5, "1", True, None])
def test_non_integer_priority_is_refused(priority):
    core, _ = make_core(scheduling_policy="priority")
    with pytest.raises(ValueError, match=r"^priority must be an integer"):
        core.add_request("a", [1], params(), priority=priority)


def test_priority_under_fcfs_is_refused_but_zero_is_fine():
    core, _ = make_core()
    with pytest.raises(ValueError, match=r"^priority 3 needs the priority scheduling policy"):
        core.add_request("a", [1], params(), priority=3)
    core.add_request("b", [1], params(), priority=0)
    pcore, _ = make_core(scheduling_policy="priority")
    assert pcore.add_request("c", [1], params(), priority=-7).priority == -7


@pytest.mark.parametrize("kw,field", [({"scheduling_policy": "lifo"}, "scheduling_policy"),
                                      ({"request_timeout": -1.0}, "request_timeout"),
                                      ({"request_timeout": math.nan}, "request_timeout")])
def test_bad_config(kw, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        EngineConfig(**kw)


def test_cli_flags():
    import argparse

    p = EngineConfig.add_cli_args(argparse.ArgumentParser())
    args = p.parse_args(["--scheduling-policy", "priority", "--request-timeout", "30"])
    cfg = EngineConfig.from_cli_args(args)
    assert cfg.scheduling_policy == "priority" and cfg.request_timeout == 30.0
    with pytest.raises(SystemExit):
        p.parse_args(["--scheduling-policy", "lifo"])


def test_timed_out_counter_metric():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from services.gen.pagedserve.v1 import scheduler_pb2
    from services.metrics import SchedulerMetrics

    reg = CollectorRegistry()
    m = SchedulerMetrics(registry=reg)
    st = scheduler_pb2.SchedulerStats()
    st.finished_by_reason["abort"] = 3
    core, clock = make_core()
    m.bind(SimpleNamespace(last_stats=st, info=SimpleNamespace(model_name="tiny", block_size=16), core=core))
    core.add_request("a", [1], params(), timeout=1.0)
    clock.t += 2
    core.step()

    def samples():
        return {s.name: s for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}

    assert samples()["pagedserve:num_requests_timed_out_total"].value == 1
    m.bind(SimpleNamespace(last_stats=st, info=None, core=None))  # before the executor connected
    assert samples()["pagedserve:num_requests_timed_out_total"].value == 0


@pytest.mark.parametrize("shape", ["n", "best_of", "beam"])
def test_group_requests_time_out_per_output_id_and_free_every_block(shape):
    """n>1 / best_of / beam search: the group's internal requests (hidden prefill, held samples,
    forked beams) come and go; the deadline belongs to the client's output ids."""
    core, clock = make_core(max_logprobs=20)
    if shape == "beam":
        p = SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=50, ignore_eos=True)
    elif shape == "best_of":
        p = SamplingParams(n=2, best_of=3, temperature=0.8, seed=1, max_tokens=50, ignore_eos=True)
    else:
        p = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=50, ignore_eos=True)
    core.add_generation("g", ["g-0", "g-1"], [1, 2, 3, 4, 5, 6], p, timeout=2.0)
    run_steps(core, 4)
    clock.t += 2.1
    finals = [d for d in core.step() if d.finished]
    assert sorted(d.request_id for d in finals) == ["g-0", "g-1"]
    assert all(d.finish_reason == "abort" and "timed out" in d.error_message for d in finals)
    assert core.counters.requests_timed_out == 2
    assert not core.scheduler.has_unfinished_requests()
    assert core.scheduler.block_manager.num_used_blocks == 0
    run_steps(core, 2)  # nothing left to expire or to schedule
    assert core.counters.requests_timed_out == 2
