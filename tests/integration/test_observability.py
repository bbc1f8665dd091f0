"""Observability acceptance (issue 7) against the real stack: executor, tokenizer, scheduler and a
two-worker gateway as processes on 127.0.0.1 (embedded SmolLM2 on CPU), every service with
`--metrics-port 0` and the test-mode span exporter (PAGEDSERVE_TRACE_TEST_DIR: each process
appends its finished spans as JSON lines to a file of its own).

- under a short mixed load, the gateway's /metrics (merged over both workers: prometheus_client
  multiprocess mode) parses with prometheus_client's parser and its counters equal what the test
  sent and got billed (requests by endpoint/status, prompt and generation tokens, finished
  samples); the scheduler's and executor's metrics ports agree with the engine;
- one request yields one trace whose spans come from the gateway, tokenizer, scheduler and executor
  processes, every parent inside the trace;
- headless Chromium (Debian's /usr/bin/chromium driven by playwright with executable_path) opens
  /dashboard while a load runs, sees throughput and the KV block map go above zero from the live
  stream, saves a screenshot, and logs no console error.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.gateway_stack import Proc, wait_until

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 512
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.timeout(240)


# ---------------------------------------------------------------------------- the stack
class ObservedStack:
    def __init__(self, trace_dir: Path) -> None:
        self.trace_dir = trace_dir
        env = {"PAGEDSERVE_TRACE_TEST_DIR": str(trace_dir)}
        for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER",
                  "OTEL_SDK_DISABLED", "PROMETHEUS_MULTIPROC_DIR"):
            env[k] = None  # removed: only the test exporter, whatever the machine has set
        self.procs: list[Proc] = []
        try:
            self.executor = self._start(["-m", "services.executor", "--port", "0", "--device", "cpu",
                                         "--max-model-len", str(MAX_LEN), "--kv-cache-memory-gb", "0.08",
                                         "--metrics-port", "0"], "executor", env)
            self.tokenizer = self._start(["-m", "services.tokenizer", "--port", "0",
                                          "--max-model-len", str(MAX_LEN)], "tokenizer", env)
            self.scheduler = self._start(["-m", "services.scheduler", "--port", "0", "--metrics-port", "0",
                                          "--executor-address", self.executor.address], "scheduler", env)
            self.gateway = self._start(["-m", "gateway", "--port", "0", "--workers", "2",
                                        "--scheduler-address", self.scheduler.address,
                                        "--tokenizer-address", self.tokenizer.address,
                                        "--dashboard-interval", "0.25"], "gateway", env)
        except BaseException:
            self.close()
            raise
        self.url = f"http://{self.gateway.address}"

    def _start(self, args: list[str], name: str, env: dict) -> Proc:
        p = Proc(args, name, env=env)
        self.procs.append(p)
        return p

    def wait_ready(self, timeout: float = 180) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(self.url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        ok = wait_until(lambda: healthy() or not all(p.alive() for p in self.procs), timeout, 0.25) and healthy()
        if not ok or not (self.scheduler.metrics_address and self.executor.metrics_address):
            raise RuntimeError("stack not ready:\n" + "\n".join(f"--- {p.name}\n{p.output()}" for p in self.procs))
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ObservedStack(tmp_path_factory.mktemp("spans"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------------- metrics helpers
def scrape(url: str) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} of an exposition, parsed by prometheus_client."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: dict[str, list], name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


# ---------------------------------------------------------------------------- 1. metrics
def test_metrics_counters_equal_the_load(stack):
    gw = stack.url + "/metrics"
    before = scrape(gw)
    sched_before = scrape(f"http://{stack.scheduler.metrics_address}/metrics")
    headers = {"Content-Type": "application/json"}
    completions = [{"prompt": p, "max_tokens": 6, "temperature": 0} for p in
                   ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    completions.append({"prompt": "Colors of the rainbow:", "max_tokens": 4, "temperature": 1.0, "n": 2, "seed": 3})
    chats = [{"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 5, "temperature": 0,
              "stream": True, "stream_options": {"include_usage": True}} for i in (3, 4)]
    prompt_tokens = completion_tokens = samples = 0
    reasons: dict[str, int] = defaultdict(int)

    def one(path: str, body: dict) -> None:
        nonlocal prompt_tokens, completion_tokens, samples
        with httpx.Client(base_url=stack.url, timeout=120) as c:
            if body.get("stream"):
                usage = None
                with c.stream("POST", path, json={**body, "model": stack.model}, headers=headers) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            usage = chunk.get("usage") or usage
                            for ch in chunk["choices"]:
                                if ch.get("finish_reason"):
                                    reasons[ch["finish_reason"]] += 1
                                    samples += 1
            else:
                r = c.post(path, json={**body, "model": stack.model}, headers=headers)
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]
                for ch in r.json()["choices"]:
                    reasons[ch["finish_reason"]] += 1
                    samples += 1
            prompt_tokens += usage["prompt_tokens"]
            completion_tokens += usage["completion_tokens"]

    threads = [threading.Thread(target=one, args=("/v1/completions", b)) for b in completions]
    threads += [threading.Thread(target=one, args=("/v1/chat/completions", b)) for b in chats]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    bad = httpx.post(stack.url + "/v1/completions", json={"model": stack.model, "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400
    assert bad.headers["x-request-id"]
    assert samples == 7 and prompt_tokens > 0 and completion_tokens > 0

    H = "pagedserve:http_requests_total"
    # the last generation's metrics are recorded as its response ends: let the scrape catch up
    assert wait_until(lambda: delta(scrape(gw), before, "pagedserve:e2e_request_latency_seconds_count")
                      >= len(completions) + len(chats), 10, 0.1)
    after = scrape(gw)
    assert delta(after, before, H, endpoint="/v1/completions", status="200") == len(completions)
    assert delta(after, before, H, endpoint="/v1/chat/completions", status="200") == len(chats)
    assert delta(after, before, H, endpoint="/v1/completions", status="400") == 1
    assert delta(after, before, "pagedserve:prompt_tokens_total") == prompt_tokens
    assert delta(after, before, "pagedserve:generation_tokens_total") == completion_tokens
    for reason, count in reasons.items():
        assert delta(after, before, "pagedserve:request_success_total", finished_reason=reason) == count, reason
    assert delta(after, before, "pagedserve:request_success_total") == samples
    generations = len(completions) + len(chats)  # one Generate call per prompt
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens"):
        assert delta(after, before, f"pagedserve:{hist}_count") == generations, hist
    assert delta(after, before, "pagedserve:request_generation_tokens_sum") == completion_tokens
    for hist in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(after, before, f"pagedserve:{hist}_count") == samples, hist
    # inter-token latencies: one per token after each sample's first
    assert 0 < delta(after, before, "pagedserve:inter_token_latency_seconds_count") <= completion_tokens
    assert all(lab["model_name"] == stack.model for lab, _ in after["pagedserve:prompt_tokens_total"])

    # scheduler: the engine's view of the same load (the 400 never reached it)
    sched_url = f"http://{stack.scheduler.metrics_address}/metrics"
    assert wait_until(lambda: delta(scrape(sched_url), sched_before, "pagedserve:scheduler_requests_finished_total")
                      >= samples and total(scrape(sched_url), "pagedserve:num_requests_running") == 0, 10, 0.1)
    sched = scrape(sched_url)
    assert delta(sched, sched_before, "pagedserve:scheduler_requests_finished_total") == samples
    # every prompt token is looked up once, except the last of the n=2 request's prompt: its forked
    # samples compute it each on a private copy of the partial block (engine_core/sequence_group.py)
    assert delta(sched, sched_before, "pagedserve:prefix_cache_queries_total") >= prompt_tokens - 1
    for name in ("pagedserve:num_requests_waiting", "pagedserve:kv_cache_usage_perc", "pagedserve:num_kv_blocks",
                 "pagedserve:num_preemptions_total", "pagedserve:prefix_cache_hits_total"):
        assert name in sched, name
    steps = delta(sched, sched_before, "pagedserve:scheduler_step_duration_seconds_count")
    assert steps > 0 and delta(sched, sched_before, "pagedserve:iteration_tokens_total_count") == steps
    assert delta(sched, sched_before, "pagedserve:scheduler_batch_size_sum") >= samples
    assert "pagedserve:spec_decode_draft_acceptance_rate" not in sched  # spec decode is off

    ex = scrape(f"http://{stack.executor.metrics_address}/metrics")
    assert total(ex, "pagedserve:executor_steps_total") == total(ex, "pagedserve:executor_step_duration_seconds_count")
    assert total(ex, "pagedserve:executor_steps_total") >= steps
    assert total(ex, "pagedserve:executor_num_kv_blocks") > 0 and total(ex, "pagedserve:executor_kv_block_size") == 16
    assert total(ex, "pagedserve:executor_batch_tokens_sum") >= prompt_tokens


# ---------------------------------------------------------------------------- 2. one trace
def read_spans(trace_dir: Path) -> list[dict]:
    spans = []
    for f in sorted(trace_dir.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def test_one_request_one_trace_across_all_services(stack):
    r = httpx.post(stack.url + "/v1/completions", timeout=60,
                   json={"model": stack.model, "prompt": "Tracing is", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    assert r.json()["id"] == f"cmpl-{rid}"
    # the executor exports a request's decode span once the next step tells it the request is gone
    httpx.post(stack.url + "/v1/completions", timeout=60,
               json={"model": stack.model, "prompt": "Flush", "max_tokens": 1, "temperature": 0})

    def trace_spans() -> list[dict]:
        spans = read_spans(stack.trace_dir)
        roots = [s for s in spans if s["service"] == "gateway" and s["parent_span_id"] is None
                 and s["attributes"].get("pagedserve.request_id") == rid]
        if len(roots) != 1:
            return []
        return [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]

    want = {"gateway": {"POST /v1/completions", "tokenize", "generate", "detokenize"},
            "tokenizer": {"tokenizer.Encode", "tokenizer.detokenize"},
            "scheduler": {"scheduler.Generate", "queue", "prefill", "decode"},
            "executor": {"executor.prefill", "executor.decode"}}

    def complete() -> bool:
        names = defaultdict(set)
        for s in trace_spans():
            names[s["service"]].add(s["name"])
        return all(want[k] <= names[k] for k in want)

    assert wait_until(complete, 15, 0.2), json.dumps(trace_spans(), indent=1)[:4000]
    spans = trace_spans()
    by_service = defaultdict(set)
    for s in spans:
        by_service[s["service"]].add(s["pid"])
    assert set(by_service) == {"gateway", "tokenizer", "scheduler", "executor"}
    pids = {svc: next(iter(p)) for svc, p in by_service.items()}
    assert all(len(p) == 1 for p in by_service.values()) and len(set(pids.values())) == 4  # four processes
    assert {p.p.pid for p in stack.procs if p.name != "gateway"} == {pids["tokenizer"], pids["scheduler"],
                                                                       pids["executor"]}
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent_span_id"] is None]
    assert len(roots) == 1 and roots[0]["name"] == "POST /v1/completions" and roots[0]["kind"] == "SERVER"
    assert all(s["parent_span_id"] in ids for s in spans if s is not roots[0]), "a parent outside the trace"
    parent_of = {s["span_id"]: s for s in spans}
    gen = next(s for s in spans if s["name"] == "scheduler.Generate")
    assert parent_of[gen["parent_span_id"]]["name"] == "generate"  # via gRPC metadata
    for name in ("executor.prefill", "executor.decode", "queue", "prefill", "decode"):
        s = next(x for x in spans if x["name"] == name)
        assert s["parent_span_id"] == gen["span_id"], name  # via NewRequestData.trace_context
        assert s["end_ns"] >= s["start_ns"]
    assert gen["attributes"]["pagedserve.request_id"] == f"cmpl-{rid}-0"
    detok = next(s for s in spans if s["name"] == "tokenizer.detokenize")  # per sample, in DetokenizeBatch
    assert parent_of[detok["parent_span_id"]]["name"] == "detokenize"


# ---------------------------------------------------------------------------- 3. the dashboard
def _load(url: str, model: str, stop: threading.Event, deadline: float) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            body = {"model": model, "prompt": f"Story number {i}: once upon a time", "max_tokens": 24,
                    "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": True}
            try:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError:
                time.sleep(0.1)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is missing: `make setup` installs Debian's chromium (apt-get, as root)")
def test_dashboard_in_headless_chromium(stack, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup)")
    stop = threading.Event()
    load = [threading.Thread(target=_load, args=(stack.url, stack.model, stop, time.monotonic() + 90), daemon=True)
            for _ in range(4)]
    for t in load:
        t.start()
    errors: list[str] = []
    shot = tmp_path / "dashboard.png"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
                page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}")
                        if "/dashboard/stream" not in r.url else None)
                page.goto(stack.url + "/dashboard", wait_until="load")
                try:
                    page.wait_for_function(
                        "() => { const d = window.__dashboard; return d && d.last && d.last.gen_tps > 0 "
                        "&& d.last.kv.used_blocks > 0 && d.last.running > 0 && d.history.length >= 8 }",
                        timeout=60_000, polling=100)
                except sync_api.TimeoutError:
                    state = page.evaluate("() => JSON.stringify({n: (window.__dashboard || {}).snapshots, "
                                          "last: (window.__dashboard || {}).last})")
                    page.screenshot(path=str(shot), full_page=True)
                    raise AssertionError(f"the dashboard never showed live load: {state[:3000]} {errors}") from None
                gen_tps = float(page.text_content("#gen-tps").replace(",", ""))
                used = int(page.text_content("#kv-used").split()[0])
                assert gen_tps > 0 and used > 0
                assert page.text_content("#waste").endswith("%")
                # the block map has coloured (non-background) pixels
                coloured = page.evaluate("""() => {
                    const c = document.getElementById('block-map'); const ctx = c.getContext('2d');
                    const d = ctx.getImageData(0, 0, c.width, c.height).data; let n = 0;
                    for (let i = 0; i < d.length; i += 4) {
                      const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
                      if (Math.max(r, g, b) - Math.min(r, g, b) > 60) n++;
                    }
                    return n; }""")
                assert coloured > 0
                page.wait_for_timeout(300)
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        stop.set()
        for t in load:
            t.join(30)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("PAGEDSERVE_DASHBOARD_SCREENSHOT")  # e.g. docs/dashboard.png
    if keep:
        shutil.copyfile(shot, keep)
    assert not errors, errors
