"""Gateway settings (the `python -m gateway` flags, or passed to `create_app` directly)."""
from __future__ import annotations

from dataclasses import dataclass

from services.grpc_server import SCHEDULER_PORT, TOKENIZER_PORT

DEFAULT_MAX_BODY_BYTES = 10 * 2**20


@dataclass
class GatewayConfig:
    # The scheduler replicas (gateway/routing/): a comma list of HOST:PORT, or, when scheduler_dns
    # is set (NAME:PORT, e.g. a headless Service), every address that name resolves to, re-resolved
    # every scheduler_dns_interval_s.
    scheduler_address: str = f"127.0.0.1:{SCHEDULER_PORT}"
    scheduler_dns: str | None = None
    scheduler_dns_interval_s: float = 5.0
    # Routing over the replicas (gateway/routing/policies.py): prefix | least-load | round-robin;
    # the prefix policy hashes at most routing_prefix_blocks leading KV blocks of a prompt.
    routing: str = "prefix"
    routing_prefix_blocks: int = 32
    routing_load_factor: float = 1.5
    routing_cache_threshold: float = 0.5
    # Seconds between the replicas' WatchStats snapshots (health and load).
    replica_stats_interval_s: float = 0.5
    tokenizer_address: str = f"127.0.0.1:{TOKENIZER_PORT}"
    # Served model name (what /v1/models lists and requests must name); None: the scheduler's
    # GetModelInfo model_name. Extra names the gateway also answers to (aliases).
    model_name: str | None = None
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None  # Bearer token required on /v1/* and /dashboard* when set
    metrics_auth: bool = False  # /metrics needs the key too
    # SIGTERM: in-flight streams get this long, then an in-band error chunk and [DONE] (gateway/drain.py).
    shutdown_grace_s: float = 5.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_n: int = 128  # OpenAI's limit on n
    root_path: str = ""
    # Deadlines of the unary backend RPCs (tokenize, template, model info, abort) and of /health.
    rpc_timeout_s: float = 30.0
    health_timeout_s: float = 3.0
    # Retry-After seconds on a 429 (the scheduler queue full).
    retry_after_s: int = 1
    # Seconds between the live dashboard's snapshots (Scheduler.WatchStats interval).
    dashboard_interval_s: float = 0.5
    # Admission caps of one request (gateway/admission.py).
    max_prompts: int = 256
    max_request_prompt_tokens: int = 1 << 20
    tokenize_concurrency: int = 4
    # How the gateway authenticates to the internal services (services/internal_auth.py; file paths;
    # the token itself only ever comes from $PAGEDSERVE_SERVICE_TOKEN or this file).
    service_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
