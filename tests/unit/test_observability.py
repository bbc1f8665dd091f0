"""Observability pieces without the stack (issue 7): the dashboard's snapshot reduction (block map,
shared blocks, internal waste), the latency window, metric labels, the scheduler's collector,
multiprocess metrics merged over gateway workers, the tracing helpers (test-file exporter, W3C
context through gRPC metadata and NewRequestData) and the request id on log lines."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.dashboard import _Rates, snapshot_payload
from gateway.metrics import LatencyWindow, endpoint_label
from services.gen.pagedserve.v1 import scheduler_pb2

ROOT = Path(__file__).resolve().parents[2]


def _env(extra: dict | None) -> dict:
    """os.environ + extra; None values remove the variable (an empty PROMETHEUS_MULTIPROC_DIR is not
    "unset" for prometheus_client: it writes its files into the working directory)."""
    env = {**os.environ, **(extra or {})}
    return {k: v for k, v in env.items() if v is not None}


def _run(code: str, env: dict | None = None, cwd: Path = ROOT) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=cwd, capture_output=True,
                         text=True, timeout=120, env=_env(env))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# ---------------------------------------------------------------------------- dashboard payload
def test_snapshot_payload_block_map_and_waste():
    st = scheduler_pb2.SchedulerStats(timestamp=1.0, num_running=2, num_waiting=1, kv_cache_usage=0.5,
                                      num_kv_blocks=10, num_free_blocks=6, prefix_cache_queries=40,
                                      prefix_cache_hits=16, prefix_cache_hit_rate=0.4)
    st.finished_by_reason["stop"] = 3
    # a and b share block 1 (a common prefix); a goes on in block 2, b in block 3
    st.requests.add(request_id="a", status="running", num_prompt_tokens=18, num_output_tokens=2,
                    num_computed_tokens=20, block_ids=[1, 2])
    st.requests.add(request_id="b", status="running", num_prompt_tokens=20, num_output_tokens=0,
                    num_computed_tokens=20, block_ids=[1, 3])
    st.requests.add(request_id="c", status="preempted", num_prompt_tokens=5, num_output_tokens=1,
                    num_computed_tokens=0, block_ids=[])
    st.blocks.add(block_id=1, ref_count=2, cached=True, request_ids=["a", "b"])
    st.blocks.add(block_id=2, ref_count=1, cached=False, request_ids=["a"])
    st.blocks.add(block_id=3, ref_count=1, cached=False, request_ids=["b"])
    st.blocks.add(block_id=7, ref_count=0, cached=True, request_ids=[])
    p = snapshot_payload(st, block_size=16, model="m", rates=_Rates())
    assert (p["running"], p["waiting"], p["preempted"]) == (2, 1, 1)
    kv = p["kv"]
    # used blocks 1, 2, 3 = 48 slots; filled: block 1 16 (shared, counted once), 2: 4, 3: 4
    assert (kv["used_blocks"], kv["shared_blocks"], kv["cached_free_blocks"]) == (3, 1, 1)
    assert (kv["slots"], kv["filled_slots"]) == (48, 24)
    assert kv["waste_pct"] == 50.0
    assert p["blocks"][0] == [1, 2, 1, [0, 1]] and p["blocks"][3] == [7, 0, 1, []]
    assert [r["id"] for r in p["requests"]] == ["a", "b", "c"]
    assert p["finished_total"] == 3 and p["prefix_hit_rate"] == 0.4
    json.dumps(p)  # what the SSE stream sends


def test_rates_window():
    r = _Rates()
    assert r.update(0.0, 0, 0, 0) == (0.0, None)
    rate, hit = r.update(2.0, 10, 100, 25)
    assert rate == 5.0 and hit == 0.25
    rate, hit = r.update(3.0, 1, 10, 0)  # counters went back: a restarted scheduler
    assert rate == 0.0 and hit is None


def test_latency_window_percentiles_and_labels():
    w = LatencyWindow(window_s=60)
    for v in range(1, 101):
        w.add_ttft(v / 1000)
    s = w.summary()
    assert s["ttft"]["n"] == 100 and s["ttft"]["p50"] == 0.05 and s["ttft"]["p99"] == 0.099
    assert s["itl"] == {"n": 0, "p50": None, "p90": None, "p99": None}
    assert endpoint_label("/v1/completions") == "/v1/completions"
    assert endpoint_label("/v1/models/x/y") == "/v1/models/{model}"
    assert endpoint_label("/wp-admin/../../etc") == "other"  # no unbounded label values


# ---------------------------------------------------------------------------- scheduler collector
def test_scheduler_collector_names():
    from services.metrics import SchedulerMetrics

    reg = CollectorRegistry()
    m = SchedulerMetrics(registry=reg)
    st = scheduler_pb2.SchedulerStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_kv_blocks=100,
                                      num_free_blocks=75, num_tokens_in_used_blocks=300, prefix_cache_queries=50,
                                      prefix_cache_hits=20, num_preemptions=4, num_steps=9, executor_healthy=True)
    st.finished_by_reason["length"] = 5
    counters = SimpleNamespace(spec_decode_num_draft_tokens=0, spec_decode_num_accepted_tokens=0)
    m.bind(SimpleNamespace(last_stats=st, info=SimpleNamespace(model_name="tiny", block_size=16),
                           core=SimpleNamespace(counters=counters)))
    m.observe_step("tiny", 0.01, 64, 3)
    samples = {s.name: s for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    assert samples["pagedserve:num_requests_running"].value == 3
    assert samples["pagedserve:num_requests_waiting"].labels == {"model_name": "tiny"}
    assert samples["pagedserve:kv_cache_usage_perc"].value == 0.25
    assert samples["pagedserve:prefix_cache_hits_total"].value == 20
    assert samples["pagedserve:num_preemptions_total"].value == 4
    assert samples["pagedserve:kv_cache_token_slots"].value == 25 * 16
    assert samples["pagedserve:scheduler_requests_finished_total"].labels["finished_reason"] == "length"
    assert samples["pagedserve:iteration_tokens_total_sum"].value == 64
    assert "pagedserve:spec_decode_draft_acceptance_rate" not in samples
    counters.spec_decode_num_draft_tokens, counters.spec_decode_num_accepted_tokens = 10, 7
    samples = {s.name: s for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    assert samples["pagedserve:spec_decode_draft_acceptance_rate"].value == 0.7
    counters.spec_decode_num_drafts, counters.spec_decode_num_accepted_tokens_per_pos = 4, [4, 2, 1, 0]
    samples = [s for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples]
    by_name = {s.name: s for s in samples}
    assert by_name["pagedserve:spec_decode_num_drafts_total"].value == 4
    assert by_name["pagedserve:spec_decode_mean_acceptance_length"].value == 1 + 7 / 4
    per_pos = {s.labels["position"]: s.value for s in samples
               if s.name == "pagedserve:spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_pos == {"0": 4, "1": 2, "2": 1, "3": 0}


# ---------------------------------------------------------------------------- gateway workers
def test_multiprocess_metrics_merge_workers(tmp_path):
    """Two 'workers' count into PROMETHEUS_MULTIPROC_DIR; /metrics' renderer adds them up."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    work = """
        import sys
        from gateway.metrics import GatewayMetrics
        m = GatewayMetrics.get()
        m.prompt_tokens.labels("m").inc(int(sys.argv[1]))
        m.http_requests.labels("/v1/completions", "POST", "200").inc()
        m.ttft.labels("m").observe(0.2)
    """
    for n in (5, 7):
        subprocess.run([sys.executable, "-c", textwrap.dedent(work), str(n)], cwd=ROOT, check=True, timeout=60,
                       env=_env(env))
    out = _run("""
        from gateway.metrics import render
        body, ctype = render()
        print(ctype)
        print(body.decode())
    """, env)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out.split("\n", 1)[1]) for s in f.samples}
    assert samples[("pagedserve:prompt_tokens_total", (("model_name", "m"),))] == 12
    assert samples[("pagedserve:http_requests_total",
                    (("endpoint", "/v1/completions"), ("method", "POST"), ("status", "200")))] == 2
    assert samples[("pagedserve:time_to_first_token_seconds_count", (("model_name", "m"),))] == 2


# ---------------------------------------------------------------------------- tracing
def test_tracing_propagation_and_test_exporter(tmp_path):
    out = _run("""
        import json, os
        from opentelemetry import trace
        from services import tracing
        assert tracing.setup_tracing("unit") is True
        t = tracing.tracer()
        with t.start_as_current_span("root") as root:
            md = tracing.grpc_metadata(request_id="rid-1")
            carrier = tracing.carrier()
        keys = dict(md)
        assert keys["x-request-id"] == "rid-1" and keys["traceparent"].startswith("00-")
        class Ctx:
            def invocation_metadata(self):
                return md
        with tracing.server_span(Ctx(), "svc.Call") as s:
            assert tracing.REQUEST_ID.get() == "rid-1"
            tracing.record_span("child", s.context, tracing.mono_to_ns(0.0) + 1, tracing.mono_to_ns(0.0) + 2)
        assert tracing.REQUEST_ID.get() is None
        ctx = tracing.context_from_carrier(carrier)
        tracing.record_span("from-carrier", ctx, 1, 2)
        print(format(root.get_span_context().trace_id, "032x"))
    """, {"PAGEDSERVE_TRACE_TEST_DIR": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": None, "OTEL_TRACES_EXPORTER": None,
          "OTEL_SDK_DISABLED": None})
    trace_id = out.split()[-1]
    (f,) = tmp_path.glob("unit-*.jsonl")
    spans = {s["name"]: s for s in map(json.loads, f.read_text().splitlines())}
    assert set(spans) == {"root", "svc.Call", "child", "from-carrier"}
    assert {s["trace_id"] for s in spans.values()} == {trace_id}
    assert spans["svc.Call"]["parent_span_id"] == spans["root"]["span_id"]
    assert spans["svc.Call"]["kind"] == "SERVER"
    assert spans["svc.Call"]["attributes"]["pagedserve.request_id"] == "rid-1"
    assert spans["child"]["parent_span_id"] == spans["svc.Call"]["span_id"]
    assert spans["from-carrier"]["parent_span_id"] == spans["root"]["span_id"]


def test_tracing_is_off_by_default():
    out = _run("""
        from services import tracing
        print(tracing.setup_tracing("unit"), tracing.grpc_metadata(request_id=""), tracing.carrier())
    """, {"PAGEDSERVE_TRACE_TEST_DIR": None, "OTEL_EXPORTER_OTLP_ENDPOINT": None, "OTEL_TRACES_EXPORTER": None,
          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None})
    assert out.split() == ["False", "None", "{}"]


def test_trace_context_crosses_the_step_contract():
    from engine_core.sampling_params import SamplingParams
    from engine_core.scheduler_output import NewRequestData, SchedulerOutput
    from services import convert

    ctx = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    so = SchedulerOutput(step_id=1, scheduled_new_reqs=[
        NewRequestData("r", [1, 2], SamplingParams(), [1], 0, trace_context=ctx),
        NewRequestData("s", [3], SamplingParams(), [2], 0)], num_scheduled_tokens={"r": 2, "s": 1},
        total_num_scheduled_tokens=3)
    back = convert.scheduler_output_from_proto(convert.scheduler_output_to_proto(so))
    assert back.scheduled_new_reqs[0].trace_context == ctx
    assert back.scheduled_new_reqs[1].trace_context is None


def test_request_id_on_log_lines(capsys):
    from services.grpc_server import configure_logging
    from services.tracing import REQUEST_ID

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("text", "json"):
            configure_logging("info", fmt, "unit")
            token = REQUEST_ID.set("req-42")
            logging.getLogger("x").info("inside")
            REQUEST_ID.reset(token)
            logging.getLogger("x").info("outside")
            inside, outside = capsys.readouterr().err.strip().splitlines()
            if fmt == "text":
                assert "x [req=req-42]: inside" in inside and "req=" not in outside
            else:
                assert json.loads(inside)["request_id"] == "req-42" and "request_id" not in json.loads(outside)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
