"""`pagedserve` command line: generate (offline engine, streams to the terminal), serve (the whole
gRPC stack + gateway), client (streaming gRPC client), bench."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine_core.config import EngineConfig
    from engine_core.llm_engine import LLMEngine
    from engine_core.sampling_params import SamplingParams

    try:
        config = EngineConfig.from_cli_args(args, model=args.model)
        engine = LLMEngine(config)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed_sampling)
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
        t0 = time.perf_counter()
        engine.add_request("cli", prompt, params)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    printed = 0
    n_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
            n_tokens = len(out.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    print(f"\n[{n_tokens} tokens in {dt:.2f}s, {n_tokens / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine_core.config import EngineConfig

    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with the in-process engine")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="GGUF file, HF directory or dummy:<config.json>; default: embedded SmolLM2")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed-sampling", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap the prompt in the model's chat template (default on)")
    EngineConfig.add_cli_args(gen)
    gen.set_defaults(func=_cmd_generate)

    try:
        from services.launcher import add_serve_parser
        add_serve_parser(sub)
    except ImportError:
        pass
    try:
        from services.client import add_client_parser
        add_client_parser(sub)
    except ImportError:
        pass
    try:  # benchmarks/ is not an installed package: the `pagedserve` script needs the repo root on the path
        from pathlib import Path
        if (root := str(Path(__file__).resolve().parent.parent)) not in sys.path:
            sys.path.append(root)
        from benchmarks.serve_bench import add_bench_parser
        add_bench_parser(sub)
    except ImportError:
        pass
    try:
        from services.healthcheck import add_health_parser
        add_health_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
