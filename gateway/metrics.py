"""The gateway's Prometheus metrics (`GET /metrics`), names after vLLM's under `pagedserve:`
(DESIGN.md §6, docs/observability.md), and the in-process latency window the dashboard shows.

Measured here, where the client's experience is:
- HTTP: `pagedserve:http_requests_total{endpoint,method,status}`, request duration, in flight;
- per generation (one prompt's Generate call, its n samples): time to first token (HTTP request
  arrival -> first token at the gateway, tokenization included), inter-token latency (between
  token-bearing messages of a sample, spread over the tokens they carry), end-to-end latency,
  prompt / generation tokens (exactly what `usage` bills), finished samples by reason;
- from the scheduler's final Generate message (its RequestMetrics): queue, prefill and decode time.

Several workers (`python -m gateway --workers N`) share counters through prometheus_client's
multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` must name an empty directory before the workers
start (`gateway/__main__.py` makes a temporary one when it is unset) and `/metrics` then merges
every worker's files. Each metric is created once per process (`GatewayMetrics.get()`), so apps
created several times in one process (tests) share them.
"""
from __future__ import annotations

# Must run before prometheus_client loads (it reads the env var at import).
import services.prometheus_env  # noqa: F401

# isort: split

import collections
import math
import os
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "pagedserve:"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

KNOWN_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/metrics",
                   "/dashboard", "/dashboard/stream")


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (unknown paths are `other`: no label explosion)."""
    if path in KNOWN_ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/dashboard/"):
        return "/dashboard/static"
    return "other"


_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def method_label(method: str) -> str:
    """A bounded label for an HTTP method (clients may send any token: junk ones are `other`)."""
    return method if method in _METHODS else "other"


class GatewayMetrics:
    _instance: GatewayMetrics | None = None
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        m = ["model_name"]
        r = registry
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests answered, by endpoint and status.",
                                     ["endpoint", "method", "status"], registry=r)
        self.http_duration = Histogram(PREFIX + "http_request_duration_seconds",
                                       "HTTP request duration (streams: until the last byte).", ["endpoint"],
                                       buckets=HTTP_BUCKETS, registry=r)
        self.http_in_flight = Gauge(PREFIX + "http_requests_in_flight", "HTTP requests being answered.",
                                    ["endpoint"], registry=r, multiprocess_mode="livesum")
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "HTTP request arrival to the first generated token at the gateway.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens of a sample.",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "HTTP request arrival to the last token of the prompt's samples.", m,
                             buckets=REQUEST_TIME_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds",
                                    "Time a sample waited in the scheduler queue (scheduler's timing).", m,
                                    buckets=REQUEST_TIME_BUCKETS, registry=r)
        self.prefill_time = Histogram(PREFIX + "request_prefill_time_seconds",
                                      "First scheduled to first token (scheduler's timing).", m,
                                      buckets=REQUEST_TIME_BUCKETS, registry=r)
        self.decode_time = Histogram(PREFIX + "request_decode_time_seconds",
                                     "First token to finish (scheduler's timing).", m,
                                     buckets=REQUEST_TIME_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of accepted requests (usage).", m,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens",
                                         "Generated tokens delivered to clients (usage).", m, registry=r)
        self.request_success = Counter(PREFIX + "request_success",
                                       "Finished samples by finish reason (stop, length, abort, error).",
                                       [*m, "finished_reason"], registry=r)
        self.request_prompt_tokens = Histogram(PREFIX + "request_prompt_tokens", "Prompt tokens per request.",
                                               m, buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                                   "Generated tokens per request (all samples).", m,
                                                   buckets=TOKEN_BUCKETS, registry=r)
        # Messages on the worker's multiplexed backend streams (per engine step, not per token:
        # DESIGN.md §1): "scheduler" = GenerateStream messages received, "detokenize" = DetokenizeBatch
        # messages sent.
        self.client_disconnects = Counter(PREFIX + "client_disconnects",
                                          "Requests whose client left before the answer was complete.",
                                          ["endpoint"], registry=r)
        self.stream_messages = Counter(PREFIX + "gateway_stream_messages",
                                       "Messages on the gateway's per-step backend streams.", ["stream"], registry=r)
        # Scheduler replicas (gateway/routing/, issue 18), labelled by the replica's address: where
        # generations went, which ones moved before their first token, and each replica's state as
        # its WatchStats stream last reported it (the scheduler's own totals, hence gauges).
        rep = ["replica"]
        self.replica_requests = Counter(PREFIX + "replica_requests", "Generations routed to each scheduler replica.",
                                        [*rep, "policy"], registry=r)
        self.replica_retries = Counter(PREFIX + "replica_retries",
                                       "Generations moved off a failed replica before their first token.", rep,
                                       registry=r)
        self.replica_healthy = Gauge(PREFIX + "replica_healthy", "1 while the replica is in the rotation.", rep,
                                     registry=r, multiprocess_mode="max")
        self.replica_running = Gauge(PREFIX + "replica_num_requests_running", "Requests running on the replica.",
                                     rep, registry=r, multiprocess_mode="max")
        self.replica_waiting = Gauge(PREFIX + "replica_num_requests_waiting", "Requests waiting on the replica.",
                                     rep, registry=r, multiprocess_mode="max")
        self.replica_kv_usage = Gauge(PREFIX + "replica_kv_cache_usage_perc", "The replica's KV-cache usage (0-1).",
                                      rep, registry=r, multiprocess_mode="max")
        self.replica_prefix_hits = Gauge(PREFIX + "replica_prefix_cache_hits",
                                         "The replica's prefix-cache hits (tokens, its running total).", rep,
                                         registry=r, multiprocess_mode="max")
        self.replica_prefix_queries = Gauge(PREFIX + "replica_prefix_cache_queries",
                                            "The replica's prefix-cache queries (tokens, its running total).", rep,
                                            registry=r, multiprocess_mode="max")

    @classmethod
    def get(cls) -> GatewayMetrics:
        if cls._instance is None:
            with cls._lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance


def render() -> tuple[bytes, str]:
    """The exposition text for `GET /metrics`: this process's registry, or every worker's
    (multiprocess mode)."""
    GatewayMetrics.get()  # the families exist (at zero) before the first request
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE
    return generate_latest(REGISTRY), CONTENT_TYPE


# ---------------------------------------------------------------------------- dashboard window
class LatencyWindow:
    """Recent TTFT / inter-token latencies (this process) for the dashboard's percentiles."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 50_000) -> None:
        self.window_s = window_s
        self._ttft: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)
        self._itl: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)
        self._e2e: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)

    def add_ttft(self, v: float) -> None:
        self._ttft.append((time.monotonic(), v))

    def add_itl(self, v: float) -> None:
        self._itl.append((time.monotonic(), v))

    def add_e2e(self, v: float) -> None:
        self._e2e.append((time.monotonic(), v))

    def _recent(self, dq: collections.deque, now: float) -> list[float]:
        cutoff = now - self.window_s
        while dq and dq[0][0] < cutoff:
            dq.popleft()
        return [v for _, v in dq]

    @staticmethod
    def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float | None]:
        if not values:
            return {f"p{p}": None for p in ps}
        s = sorted(values)
        out = {}
        for p in ps:  # nearest rank
            out[f"p{p}"] = s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]
        return out

    def summary(self) -> dict:
        now = time.monotonic()
        ttft, itl, e2e = self._recent(self._ttft, now), self._recent(self._itl, now), self._recent(self._e2e, now)
        return {"window_s": self.window_s,
                "ttft": {"n": len(ttft), **self.percentiles(ttft)},
                "itl": {"n": len(itl), **self.percentiles(itl)},
                "e2e": {"n": len(e2e), **self.percentiles(e2e)}}


WINDOW = LatencyWindow()
