"""Prometheus metrics of the scheduler and executor services (`--metrics-port`), names after vLLM's
under the prefix `pagedserve:` (DESIGN.md §6, docs/observability.md). The gateway's request-level
metrics live in gateway/metrics.py.

Scheduler (`SchedulerMetrics`): queue and KV-cache state are read at scrape time from the engine
thread's last published snapshot (`EngineLoop.last_stats`, at most 0.25 s old), so a scrape never
waits for a step; per-step histograms are observed by the engine thread itself.
Executor (`ExecutorMetrics`): per-step histograms observed around each `execute`, and the KV
geometry as gauges.
"""
from __future__ import annotations

# Must run before prometheus_client loads (it reads the env var at import).
import services.prometheus_env  # noqa: F401

# isort: split

import logging
from collections.abc import Iterator

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "pagedserve:"

STEP_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)


def start_metrics_server(name: str, host: str, port: int,
                         registry: CollectorRegistry = REGISTRY) -> tuple[object, str]:
    """Serve `registry` at http://host:port/metrics on a daemon thread (port 0: any free port).
    Prints `<name> metrics on http://HOST:PORT/metrics` (launchers and tests read it)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_port
    shown = f"[{host}]" if ":" in host else host
    address = f"{shown}:{bound}"
    logger.info("%s metrics on http://%s/metrics", name, address)
    print(f"{name} metrics on http://{address}/metrics", flush=True)
    return server, address


def maybe_start_metrics_server(name: str, args) -> tuple[object, str] | None:
    """From the common `--metrics-port` / `--metrics-host` flags; None when metrics are off."""
    if getattr(args, "metrics_port", None) is None:
        return None
    host = args.metrics_host or args.host
    return start_metrics_server(name, host, args.metrics_port)


# ============================================================================ scheduler
class _SchedulerCollector(Collector):
    """Gauges and counters from the engine loop's last published SchedulerStats."""

    def __init__(self, metrics: SchedulerMetrics) -> None:
        self.m = metrics

    def describe(self):  # no collect() at registration time (the engine may not exist yet)
        return []

    def collect(self) -> Iterator:
        engine = self.m.engine
        if engine is None:
            return
        st = engine.last_stats
        info = engine.info
        model = info.model_name if info is not None else ""
        block_size = info.block_size if info is not None else 0
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([model], float(value))
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric([model], float(value))
            return c

        used = max(0, st.num_kv_blocks - st.num_free_blocks)
        yield gauge("num_requests_running", "Requests (samples) in the running batch.", st.num_running)
        yield gauge("num_requests_waiting", "Requests (samples) waiting to be scheduled.", st.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", st.kv_cache_usage)
        yield gauge("num_kv_blocks", "Usable KV-cache blocks.", st.num_kv_blocks)
        yield gauge("num_free_kv_blocks", "KV-cache blocks free or evictable (cached prefix, no holder).",
                    st.num_free_blocks)
        yield gauge("num_cached_kv_blocks", "KV-cache blocks registered in the prefix cache.",
                    st.num_kv_blocks_cached)
        yield gauge("kv_cache_tokens_held", "Live tokens held by running requests' KV blocks.",
                    st.num_tokens_in_used_blocks)
        yield gauge("kv_cache_token_slots", "Token slots of the KV blocks in use (used blocks x block size).",
                    used * block_size)
        yield gauge("executor_healthy", "1 while the executor answers, 0 while it is away.",
                    1 if st.executor_healthy else 0)
        yield gauge("max_queue_len", "Waiting-queue limit (0: none); beyond it requests get HTTP 429.",
                    st.max_queue_len)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", st.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", st.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted (KV blocks ran out; recomputed later).",
                      st.num_preemptions)
        yield counter("scheduler_steps", "Engine steps executed.", st.num_steps)
        yield counter("executor_restarts", "Failed steps that made the scheduler replay its requests.",
                      st.executor_restarts)
        yield counter("num_requests_rejected", "Generate calls refused because the waiting queue was full.",
                      st.num_requests_rejected)
        counters = getattr(engine.core, "counters", None)
        yield counter("num_requests_timed_out", "Requests (samples) aborted because their timeout passed "
                      "(also counted under finished_reason=\"abort\").",
                      getattr(counters, "requests_timed_out", 0))
        fin = CounterMetricFamily(PREFIX + "scheduler_requests_finished",
                                  "Requests (samples) finished in the scheduler, by finish reason.",
                                  labels=["model_name", "finished_reason"])
        for reason, count in sorted(st.finished_by_reason.items()):
            fin.add_metric([model, reason], float(count))
        yield fin
        core = engine.core
        counters = getattr(core, "counters", None)
        drafts = getattr(counters, "spec_decode_num_draft_tokens", 0) if counters is not None else 0
        if drafts:  # only when speculative decoding is on
            accepted = counters.spec_decode_num_accepted_tokens
            yield counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed.", drafts)
            yield counter("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.", accepted)
            yield gauge("spec_decode_draft_acceptance_rate", "Accepted / proposed draft tokens (cumulative).",
                        accepted / drafts)
            num_drafts = getattr(counters, "spec_decode_num_drafts", 0)
            yield counter("spec_decode_num_drafts", "Draft verifications (requests x steps with drafts).", num_drafts)
            if num_drafts:
                yield gauge("spec_decode_mean_acceptance_length",
                            "Tokens emitted per verification: 1 + accepted drafts (cumulative mean).",
                            1 + accepted / num_drafts)
            per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted draft tokens by position in the draft.",
                                          labels=["model_name", "position"])
            for pos, n in enumerate(getattr(counters, "spec_decode_num_accepted_tokens_per_pos", [])):
                per_pos.add_metric([model, str(pos)], float(n))
            yield per_pos


class SchedulerMetrics:
    """Register once per process; `bind(engine)` points the collector at the engine loop."""

    _instance: SchedulerMetrics | None = None

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.engine = None
        self.step_time = Histogram(PREFIX + "scheduler_step_duration_seconds",
                                   "Wall time of one engine step (schedule, executor round trip, update).",
                                   ["model_name"], buckets=STEP_TIME_BUCKETS, registry=registry)
        self.iteration_tokens = Histogram(PREFIX + "iteration_tokens_total", "Tokens scheduled per engine step.",
                                          ["model_name"], buckets=BATCH_TOKEN_BUCKETS, registry=registry)
        self.batch_size = Histogram(PREFIX + "scheduler_batch_size", "Requests scheduled per engine step.",
                                    ["model_name"], buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self._children: dict[str, tuple] = {}
        registry.register(_SchedulerCollector(self))

    @classmethod
    def get(cls) -> SchedulerMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def bind(self, engine) -> None:
        self.engine = engine

    def observe_step(self, model: str, seconds: float, num_tokens: int, num_seqs: int) -> None:
        children = self._children.get(model)
        if children is None:
            children = self._children[model] = (self.step_time.labels(model), self.iteration_tokens.labels(model),
                                                self.batch_size.labels(model))
        children[0].observe(seconds)
        children[1].observe(num_tokens)
        children[2].observe(num_seqs)


# ============================================================================ executor
class ExecutorMetrics:
    _instance: ExecutorMetrics | None = None

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        labels = ["model_name"]
        self.step_time = Histogram(PREFIX + "executor_step_duration_seconds",
                                   "Time the executor spent running one step (inputs, forward, sampling).",
                                   labels, buckets=STEP_TIME_BUCKETS, registry=registry)
        self.batch_tokens = Histogram(PREFIX + "executor_batch_tokens", "Tokens computed per executor step.",
                                      labels, buckets=BATCH_TOKEN_BUCKETS, registry=registry)
        self.batch_requests = Histogram(PREFIX + "executor_batch_requests", "Requests per executor step.",
                                        labels, buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.steps = Counter(PREFIX + "executor_steps", "Steps executed.", labels, registry=registry)
        self.failures = Counter(PREFIX + "executor_step_failures", "Steps that failed (by gRPC status).",
                                [*labels, "code"], registry=registry)
        self.num_kv_blocks = Gauge(PREFIX + "executor_num_kv_blocks", "KV-cache blocks allocated on the device.",
                                   labels, registry=registry)
        self.block_size = Gauge(PREFIX + "executor_kv_block_size", "Tokens per KV-cache block.", labels,
                                registry=registry)
        self.kv_bytes = Gauge(PREFIX + "executor_kv_cache_bytes", "Bytes of KV cache allocated.", labels,
                              registry=registry)
        self.num_requests = Gauge(PREFIX + "executor_num_requests", "Requests the executor holds state for.",
                                  labels, registry=registry)
        self.model = ""
        self._step = self._tokens = self._reqs = self._count = None

    @classmethod
    def get(cls) -> ExecutorMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def set_info(self, info) -> None:
        m = self.model = info.model_name
        self.num_kv_blocks.labels(m).set(info.num_kv_blocks)
        self.block_size.labels(m).set(info.block_size)
        self.kv_bytes.labels(m).set(getattr(info, "kv_cache_bytes", 0) or 0)
        self._step, self._tokens = self.step_time.labels(m), self.batch_tokens.labels(m)
        self._reqs, self._count = self.batch_requests.labels(m), self.steps.labels(m)

    def observe_step(self, seconds: float, num_tokens: int, num_requests: int, held: int) -> None:
        if self._step is None:
            return
        self._step.observe(seconds)
        self._tokens.observe(num_tokens)
        self._reqs.observe(num_requests)
        self._count.inc()
        self.num_requests.labels(self.model).set(held)

    def failed(self, code: str) -> None:
        self.failures.labels(self.model, code).inc()
