"""`pagedserve` command line: generate (offline engine, streams to the terminal), serve (the whole
gRPC stack + gateway), client (streaming gRPC client), bench."""
from __future__ import annotations

import argparse
import importlib
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


# Subcommands that need the `serve` extra (grpcio, protobuf, fastapi, httpx): (name, module, registrar).
_OPTIONAL_COMMANDS = (
    ("serve", "services.launcher", "add_serve_parser"),
    ("client", "services.client", "add_client_parser"),
    ("bench", "benchmarks.serve_bench", "add_bench_parser"),
    ("health", "services.healthcheck", "add_health_parser"),
    ("admin", "services.admin_cli", "add_admin_parser"),
)


def _add_optional(sub: argparse._SubParsersAction, name: str, module: str, register: str) -> None:
    """Registers `name` from `module`; when that module cannot load, a placeholder that says why, so
    the rest of the CLI (`generate`) keeps working and `pagedserve <name>` explains instead of vanishing."""
    try:
        getattr(importlib.import_module(module), register)(sub)
        return
    except ImportError as e:
        if (e.name or "").split(".")[0] == module.split(".")[0]:  # our own package, left out (the Docker image: benchmarks)
            reason = f"{e}: this install leaves it out"
        else:  # the serve extra is not installed
            reason = f"a dependency is missing ({e}); install it with: pip install 'pagedserve[serve]'"
    except Exception as e:  # noqa: BLE001 - the generated stubs reject an older grpcio (RuntimeError) or protobuf (VersionError)
        reason = f"{e} (pip install -U 'pagedserve[serve]' installs versions that fit)"
    p = sub.add_parser(name, help=f"unavailable (`pagedserve {name}` says why)", description=f"`pagedserve {name}` is unavailable: {reason}")
    p.set_defaults(func=lambda _args: _unavailable(name, reason), unavailable=True)


def _unavailable(name: str, reason: str) -> int:
    print(f"error: `pagedserve {name}` is unavailable: {reason}", file=sys.stderr)
    return 2


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

    for name, module, register in _OPTIONAL_COMMANDS:
        _add_optional(sub, name, module, register)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine_core.cpu_resources import set_openmp_wait_policy

    set_openmp_wait_policy()  # before torch is imported here or in the processes we start
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    # known args only: an unavailable subcommand (see _add_optional) reports why, whatever its options
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
