"""Async gRPC clients for the scheduler and tokenizer services, and gRPC status -> HTTP error mapping.

One `grpc.aio` channel per service, opened at startup and shared by every request of the process
(HTTP/2 multiplexes hundreds of concurrent streams over it; gRPC reconnects it by itself after a
service restart). Model facts that never change while the services run (served name,
max_model_len, vocabulary size, chat template presence, max logprobs) are fetched once and cached;
per-token strings for logprobs are cached by id (bounded by the vocabulary). Generation goes through
one multiplexed GenerateStream + DetokenizeBatch pair per worker and scheduler replica (`step_stream`,
gateway/step_stream.py): one message per engine step, not per token. The replicas (one or many) are
`replicas` (gateway/routing/): each generation picks one by the routing policy.

Status mapping (`rpc_error_to_api`):
    INVALID_ARGUMENT, OUT_OF_RANGE          -> 400 (the service's message names the problem)
    NOT_FOUND                               -> 404
    RESOURCE_EXHAUSTED                      -> 429 with Retry-After (the scheduler queue is full)
    UNAVAILABLE, CANCELLED (server side)    -> 503 (a backend is down or shutting down)
    DEADLINE_EXCEEDED                       -> 504
    anything else                           -> 500
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.admission import Admission, AdmissionLimits
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.routing.replica import Replica
from gateway.routing.replica_set import ReplicaSet
from services import tracing
from services.gen.pagedserve.v1 import (
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.grpc_server import channel_options
from services.internal_auth import InternalSecurity

logger = logging.getLogger(__name__)

DEFAULT_MAX_LOGPROBS = 20


_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_to_api(code: int | grpc.StatusCode, details: str, backend: str, retry_after_s: int = 1) -> APIError:
    """An in-band per-request status (GenerateStream's StreamStatus) as the API error it means."""
    if isinstance(code, int):
        code = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return _to_api(code, details, backend, retry_after_s, ())


def rpc_error_to_api(e: grpc.RpcError, backend: str, retry_after_s: int = 1) -> APIError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or ""
    trailers = (e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else ()
    return _to_api(code, details, backend, retry_after_s, trailers)


def _to_api(code: grpc.StatusCode, details: str, backend: str, retry_after_s: int, trailers) -> APIError:
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        lowered = details.lower()
        ctx = "context length" in lowered or "max_model_len" in lowered or "too long" in lowered
        # The scheduler's own checks of GenerateRequest fields name them first (priority, timeout_s).
        param = next((p for p in ("priority", "timeout") if details.startswith(p)), None)
        return APIError(400, details or f"{backend} rejected the request", param=param,
                        code="context_length_exceeded" if ctx else "invalid_value")
    if code == grpc.StatusCode.NOT_FOUND:
        return APIError(404, details or "not found", code="not_found")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = retry_after_s
        for key, value in trailers:
            if key.lower() == "retry-after":
                try:
                    retry = max(1, int(float(value)))
                except (TypeError, ValueError):
                    pass
        reason = (details or "request queue full").removesuffix("; retry later")  # said once, below
        return APIError(429, f"The server is busy ({reason}); retry later.",
                        code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return APIError(503, f"The {backend} service is unavailable: {details or code.name}.",
                        code="service_unavailable")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, f"The {backend} service did not answer in time.", code="timeout")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return APIError(500, f"The {backend} service does not implement this call ({details}).",
                        code="internal_error")
    return APIError(500, f"The {backend} service failed: {code.name}: {details}", code="internal_error")


@dataclass(frozen=True)
class ModelFacts:
    name: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    has_chat_template: bool
    created: int
    # Samples the scheduler can ever hold at once (waiting-queue limit + running slots; 0: no limit).
    capacity: int = 0
    # End-of-generation tokens the tokenizer knows (e.g. SmolLM2's <|endoftext|> next to <|im_end|>)
    # but the model's config does not: the gateway stops on them too (as stop token ids), so one
    # set of EOS tokens holds across the stack.
    extra_eos_token_ids: tuple[int, ...] = ()


class Backend:
    """The gateway's view of its backends. Create inside the event loop (`await start()`)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._tok_channel: grpc.aio.Channel | None = None
        self.tokenizer: tokenizer_pb2_grpc.TokenizerStub | None = None
        self._tok_health: health_pb2_grpc.HealthStub | None = None
        self._facts: ModelFacts | None = None
        self.replicas: ReplicaSet | None = None  # the scheduler replicas and the routing policy
        self._facts_lock: asyncio.Lock | None = None
        self._token_cache: dict[int, tuple[str, bytes]] = {}
        # Per-request caps and the worker's shared tokenizer slots (gateway/admission.py).
        self.admission = Admission(AdmissionLimits(max_prompts=config.max_prompts,
                                                   max_request_prompt_tokens=config.max_request_prompt_tokens,
                                                   tokenize_concurrency=config.tokenize_concurrency))

    async def start(self) -> None:
        opts = channel_options()
        c = self.config
        security = InternalSecurity.from_env(token_file=c.service_token_file, tls_cert=c.tls_cert, tls_key=c.tls_key,
                                             tls_ca=c.tls_ca)
        self._tok_channel = security.aio_channel(c.tokenizer_address, opts)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tok_channel)
        self._tok_health = health_pb2_grpc.HealthStub(self._tok_channel)
        self._facts_lock = asyncio.Lock()
        self.replicas = ReplicaSet(self.config, self.tokenizer, channel=security.aio_channel)
        await self.replicas.start()

    async def close(self) -> None:
        if self.replicas is not None:
            await self.replicas.close()
        if self._tok_channel is not None:
            await self._tok_channel.close(grace=None)

    @property
    def scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        """A scheduler replica for model facts and stats (a healthy one when there is one)."""
        return self.replicas.any().scheduler

    def _error(self, e: grpc.RpcError, backend: str) -> APIError:
        return rpc_error_to_api(e, backend, self.config.retry_after_s)

    # ------------------------------------------------------------------ model facts
    async def facts(self) -> ModelFacts:
        """Served model name, max_model_len, vocab size, ... (fetched once from both services)."""
        if self._facts is not None:
            return self._facts
        assert self._facts_lock is not None, "Backend.start() was not awaited"
        async with self._facts_lock:
            if self._facts is None:
                self._facts = await self._fetch_facts()
        return self._facts

    async def _fetch_facts(self) -> ModelFacts:
        import time

        timeout = self.config.rpc_timeout_s
        try:
            info = await self.scheduler.GetModelInfo(scheduler_pb2.GetModelInfoRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e, "scheduler") from None
        try:
            tinfo = await self.tokenizer.GetInfo(tokenizer_pb2.GetInfoRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e, "tokenizer") from None
        try:
            stats = await self.scheduler.GetStats(scheduler_pb2.GetStatsRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e, "scheduler") from None
        capacity = stats.max_queue_len + info.max_num_seqs if stats.max_queue_len else 0
        ex = info.executor
        max_len = ex.max_model_len or (tinfo.max_model_len if tinfo.HasField("max_model_len") else 0)
        name = self.config.model_name or ex.model_name or tinfo.model_name or "default"
        self.replicas.block_size = int(ex.block_size)
        facts = ModelFacts(name=name, max_model_len=int(max_len), vocab_size=int(ex.vocab_size or tinfo.vocab_size),
                           max_logprobs=int(info.max_logprobs or DEFAULT_MAX_LOGPROBS),
                           has_chat_template=bool(tinfo.has_chat_template), created=int(time.time()),
                           capacity=int(capacity),
                           extra_eos_token_ids=tuple(t for t in tinfo.eos_token_ids if t not in ex.eos_token_ids))
        logger.info("serving model %r (max_model_len %d, vocab %d, chat template: %s)", facts.name,
                    facts.max_model_len, facts.vocab_size, facts.has_chat_template)
        return facts

    @property
    def cached_facts(self) -> ModelFacts | None:
        """The model facts if fetched already (no RPC)."""
        return self._facts

    def served_names(self, facts: ModelFacts) -> set[str]:
        return {facts.name, *self.config.model_aliases}

    # ------------------------------------------------------------------ tokenizer
    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        from gateway.telemetry import span

        with span("tokenize", **{"pagedserve.prompt_chars": len(text)}):
            try:
                resp = await self.tokenizer.Encode(
                    tokenizer_pb2.EncodeRequest(text=text, add_special_tokens=add_special_tokens),
                    timeout=self.config.rpc_timeout_s, metadata=tracing.grpc_metadata())
            except grpc.RpcError as e:
                raise self._error(e, "tokenizer") from None
        return list(resp.token_ids)

    async def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Several texts in one tokenizer call (EncodeBatch), results in order."""
        from gateway.telemetry import span

        with span("tokenize", **{"pagedserve.prompts": len(texts)}):
            try:
                resp = await self.tokenizer.EncodeBatch(
                    tokenizer_pb2.EncodeBatchRequest(texts=list(texts), add_special_tokens=add_special_tokens),
                    timeout=self.config.rpc_timeout_s, metadata=tracing.grpc_metadata())
            except grpc.RpcError as e:
                raise self._error(e, "tokenizer") from None
        return [list(r.token_ids) for r in resp.results]

    async def apply_chat_template(self, messages: Sequence[tokenizer_pb2.ChatMessage],
                                  add_generation_prompt: bool = True, tools_json: str = "") -> tuple[str, list[int]]:
        from gateway.telemetry import span

        req = tokenizer_pb2.ApplyChatTemplateRequest(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, tools_json=tools_json)
        with span("tokenize", **{"pagedserve.messages": len(messages)}):
            try:
                resp = await self.tokenizer.ApplyChatTemplate(req, timeout=self.config.rpc_timeout_s,
                                                              metadata=tracing.grpc_metadata())
            except grpc.RpcError as e:
                err = self._error(e, "tokenizer")
                if err.status == 400:
                    err.param = "messages"
                raise err from None
        return resp.prompt, list(resp.token_ids)

    async def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        try:
            resp = await self.tokenizer.Decode(
                tokenizer_pb2.DecodeRequest(token_ids=list(token_ids), skip_special_tokens=skip_special_tokens),
                timeout=self.config.rpc_timeout_s, metadata=tracing.grpc_metadata())
        except grpc.RpcError as e:
            raise self._error(e, "tokenizer") from None
        return resp.text

    async def token_strings(self, token_ids: Sequence[int]) -> dict[int, tuple[str, bytes]]:
        """{id: (token text, token bytes)} for logprobs; cached per id."""
        cache = self._token_cache
        missing = [t for t in dict.fromkeys(token_ids) if t not in cache]
        if missing:
            try:
                resp = await self.tokenizer.DecodeTokens(tokenizer_pb2.DecodeTokensRequest(token_ids=missing),
                                                         timeout=self.config.rpc_timeout_s)
            except grpc.RpcError as e:
                raise self._error(e, "tokenizer") from None
            for t, text, raw in zip(missing, resp.tokens, resp.token_bytes):
                cache[t] = (text, raw)
        return {t: cache[t] for t in token_ids}

    @property
    def model_label(self) -> str:
        """The served model name for metric labels ("" until the facts are fetched)."""
        return self._facts.name if self._facts is not None else ""

    # ------------------------------------------------------------------ scheduler
    async def stats(self, include_requests: bool = False, timeout: float | None = None,
                    replica: Replica | None = None) -> scheduler_pb2.SchedulerStats:
        stub = (replica or self.replicas.any()).scheduler
        try:
            return await stub.GetStats(scheduler_pb2.GetStatsRequest(include_requests=include_requests),
                                       timeout=timeout or self.config.rpc_timeout_s)
        except grpc.RpcError as e:
            raise self._error(e, "scheduler") from None

    # ------------------------------------------------------------------ health
    async def health(self) -> tuple[bool, dict]:
        """(healthy, details): the tokenizer SERVING and a scheduler replica SERVING whose executor
        answers. With several replicas `replicas` has each one's check (one healthy is enough)."""
        timeout = self.config.health_timeout_s

        async def grpc_health(stub: health_pb2_grpc.HealthStub) -> str:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.RpcError as e:
                return f"unreachable: {e.code().name}"
            return "ok" if r.status == health_pb2.HealthCheckResponse.SERVING else \
                health_pb2.HealthCheckResponse.ServingStatus.Name(r.status).lower()

        async def scheduler_check(replica: Replica) -> str:
            status = await grpc_health(replica.health)
            if status != "ok":
                return status
            try:
                st = await self.stats(timeout=timeout, replica=replica)
            except APIError as e:
                return e.message
            return "ok" if st.executor_healthy else "executor not healthy"

        replicas = list(self.replicas.replicas.values())
        *per, tok = await asyncio.gather(*(scheduler_check(r) for r in replicas), grpc_health(self._tok_health))
        sched = "ok" if "ok" in per else (per[0] if per else "no scheduler replica found")
        checks: dict = {"scheduler": sched, "tokenizer": tok}
        if len(replicas) > 1 or self.config.scheduler_dns:
            checks["replicas"] = {r.address: c for r, c in zip(replicas, per)}
        return sched == "ok" and tok == "ok", checks
