"""Where detokenization should live (issue 14, docs/architecture.md): the cost per engine step of
turning S samples' new tokens into text,

1. batched in the tokenizer service: one DetokenizeBatch round trip per step (S entries), measured
   from a client in this process against `python -m services.tokenizer` (the real SmolLM2
   tokenizer, IncrementalDetokenizer with a stop string per sample);
2. in the gateway: `tokenizers.decoders.DecodeStream.step` for each sample, in this process
   (no stop strings, no hold-back of partial characters: a lower bound);
3. the old path for reference: one DetokenizeStream write + read per sample per step.

    .venv/bin/python benchmarks/detokenize_path.py [--samples 64,256] [--steps 200]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.grpc_overhead import spawn, wait_serving


async def batched(addr: str, samples: int, steps: int, tokens: list[list[int]]) -> float:
    import grpc

    from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    opts = tokenizer_pb2.DetokenizeOptions(prompt_token_ids=[1, 2, 3], stop=["never-matches"])
    async with grpc.aio.insecure_channel(addr) as ch:
        call = tokenizer_pb2_grpc.TokenizerStub(ch).DetokenizeBatch()
        t0 = 0.0
        for step in range(steps + 1):
            if step == 1:
                t0 = time.perf_counter()  # the first step opens the keys
            entries = [tokenizer_pb2.DetokenizeEntry(key=i, token_ids=[tokens[i][step]]) for i in range(samples)]
            if step == 0:
                for e in entries:
                    e.options.CopyFrom(opts)
            await call.write(tokenizer_pb2.DetokenizeBatchRequest(entries=entries))
            await call.read()
        call.cancel()
    return (time.perf_counter() - t0) / steps


async def per_sample(addr: str, samples: int, steps: int, tokens: list[list[int]]) -> float:
    import grpc

    from services.gen.pagedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    opts = tokenizer_pb2.DetokenizeOptions(prompt_token_ids=[1, 2, 3], stop=["never-matches"])
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = tokenizer_pb2_grpc.TokenizerStub(ch)
        calls = [stub.DetokenizeStream() for _ in range(samples)]

        async def one(i: int, step: int) -> None:
            req = tokenizer_pb2.DetokenizeRequest(token_ids=[tokens[i][step]])
            if step == 0:
                req.options.CopyFrom(opts)
            await calls[i].write(req)
            await calls[i].read()

        t0 = 0.0
        for step in range(steps + 1):
            if step == 1:
                t0 = time.perf_counter()
            await asyncio.gather(*(one(i, step) for i in range(samples)))
        for c in calls:
            c.cancel()
    return (time.perf_counter() - t0) / steps


def in_gateway(tokenizer_json: str, samples: int, steps: int, tokens: list[list[int]]) -> float:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    tok = Tokenizer.from_file(tokenizer_json)
    streams = [DecodeStream(skip_special_tokens=True) for _ in range(samples)]
    t0 = time.perf_counter()
    for step in range(steps):
        for i, s in enumerate(streams):
            s.step(tok, tokens[i][step])
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", default="64,256")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    import tempfile

    from engine_core.tokenizer import load_tokenizer
    from services.tokenizer.server import resolve_tokenizer_path

    tok = load_tokenizer(resolve_tokenizer_path(None)[0])
    with tempfile.TemporaryDirectory() as tmp:
        tok_json = str(Path(tmp) / "tokenizer.json")
        tok.hf.backend_tokenizer.save(tok_json)
        proc, addr = spawn("tokenizer", "services.tokenizer", ["--port", "0"], 1, Path(tmp))
        try:
            wait_serving(addr, proc=proc)
            rng = random.Random(0)
            for s in [int(x) for x in args.samples.split(",")]:
                tokens = [[rng.randrange(1000, 40000) for _ in range(args.steps + 1)] for _ in range(s)]
                b = asyncio.run(batched(addr, s, args.steps, tokens))
                g = in_gateway(tok_json, s, args.steps, tokens)
                o = asyncio.run(per_sample(addr, s, min(args.steps, 50), tokens))
                print(f"{s:4d} samples/step: DetokenizeBatch round trip {1e3 * b:6.2f} ms/step, "
                      f"in-gateway DecodeStream {1e3 * g:6.2f} ms/step, per-sample DetokenizeStream "
                      f"{1e3 * o:6.2f} ms/step", flush=True)
        finally:
            proc.stop(grace=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
