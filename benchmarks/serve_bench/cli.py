"""`pagedserve bench serve`: an online serving benchmark for any OpenAI-compatible endpoint (modelled
on `vllm bench serve`).

    pagedserve bench serve --base-url http://127.0.0.1:8000 --endpoint /v1/completions \\
        --dataset-name random --input-len 128 --output-len 128 --num-prompts 200 \\
        --max-concurrency 1,4,16,64 --goodput ttft:200 tpot:50 --result-file out/bench.json

Every request streams (SSE) with `stream_options.include_usage`, `ignore_eos: true` and
`max_tokens = output length`, so output lengths are exact. Output tokens are counted from the
usage in the final chunk (the chunk count when a server sends none). Per request:

- TTFT: request sent -> first chunk carrying text;
- ITL: gaps between successive text chunks (pooled over all requests);
- TPOT: (E2E - TTFT) / (output tokens - 1), requests with more than one output token;
- E2E: request sent -> end of the stream.

Load: `--request-rate R` (Poisson arrivals, gamma with `--burstiness`; inf: all at once) and/or
`--max-concurrency N` (at most N requests in flight; closed loop). Either may be a comma list, e.g.
`--max-concurrency 1,4,16`: one run per value (a sweep) with the same prompts. Goodput counts the
requests per second that meet every SLO given with `--goodput ttft:MS tpot:MS e2el:MS`.

Datasets (generated locally, no downloads, reproducible with --seed):
- random: input/output lengths uniform in [L*(1-r), L*(1+r)] (--range-ratio r); the text is token
  ids of --tokenizer decoded to text, or random common English words (about one token each) when
  no tokenizer is given;
- conversation: a ShareGPT-like mix: lognormal input and output lengths (medians and sigma
  configurable), a few prior turns per conversation (chat: messages; completions: a transcript);
  `--conversation-shared-prefixes K` starts each one with one of K shared system prompts of
  `--conversation-prefix-len` tokens (the workload of prefix-aware routing over replicas).
Prompt lengths in the results are the server's usage.prompt_tokens when it reports them.

Output: a summary table on stdout; with --result-file (or --save-result) a JSON file holding the
metadata (date, command, endpoint, device label) and one entry per run, plus PNG plots next to it:
`<name>_latency.png` (TTFT/TPOT/ITL/E2E mean and percentiles) and, for a sweep,
`<name>_throughput.png` (throughput and latency vs concurrency or request rate).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from benchmarks.serve_bench.driver import run_benchmark


def add_serve_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default http://127.0.0.1:8000)")
    g.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", "--dataset", default="random", choices=["random", "conversation"])
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128)
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=128)
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (default 0: exact)")
    g.add_argument("--tokenizer", default=None,
                   help="make prompts from random token ids of this tokenizer (GGUF file, HF directory or "
                        "'embedded' for SmolLM2); default: random common words")
    g.add_argument("--conversation-input-median", type=float, default=100.0)
    g.add_argument("--conversation-output-median", type=float, default=200.0)
    g.add_argument("--conversation-sigma", type=float, default=1.0, help="lognormal sigma (default 1.0)")
    g.add_argument("--conversation-max-input", type=int, default=1024)
    g.add_argument("--conversation-max-output", type=int, default=1024)
    g.add_argument("--conversation-shared-prefixes", type=int, default=0, metavar="K",
                   help="start every conversation with one of K shared system prompts (default 0: none)")
    g.add_argument("--conversation-prefix-len", type=int, default=256,
                   help="tokens of each shared system prompt (default 256)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="cap conversation lengths (default: max_model_len from GET /v1/models)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf",
                   help="requests/s, Poisson arrivals; inf: all at once; a comma list runs a sweep (default inf)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1: Poisson)")
    g.add_argument("--max-concurrency", default=None,
                   help="most requests in flight; a comma list (1,4,16) runs a sweep (default unlimited)")
    g.add_argument("--num-warmups", type=int, default=1, help="untimed requests before each run (default 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request makes exactly its output length (default on)")
    g.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="request stream_options.include_usage (default on; off: count chunks)")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g = p.add_argument_group("results")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:200 tpot:50 (keys ttft, tpot, itl, e2el)")
    g.add_argument("--percentiles", default="50,90,99", help="latency percentiles (default 50,90,99)")
    g.add_argument("--result-file", default=None, help="JSON path; plots go next to it (<name>_latency.png, ...)")
    g.add_argument("--save-result", action="store_true",
                   help="write JSON + plots under benchmarks/results/ (./results outside a checkout) when --result-file is not given")
    g.add_argument("--save-detailed", action="store_true", help="also store per-request ITLs and generated text")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--device-label", default=None, help="the server's device, recorded in the metadata")
    g.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE", help="extra metadata")
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def bench_args(**overrides) -> argparse.Namespace:
    """The CLI's defaults with `overrides` (python names: max_concurrency="1,4", num_prompts=8, ...),
    for calling run_benchmark from code."""
    ns = add_serve_bench_args(argparse.ArgumentParser()).parse_args([])
    for k, v in overrides.items():
        if not hasattr(ns, k):
            raise TypeError(f"unknown bench option {k!r}")
        setattr(ns, k, v)
    return ns


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        out = run_benchmark(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(m["completed"] > 0 for m in out["runs"]) else 1


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks (bench serve: online serving benchmark)",
                              description="Benchmarks.")
    sub = p.add_subparsers(dest="bench_command", required=True)
    s = sub.add_parser("serve", help="load-test an OpenAI-compatible endpoint (TTFT/TPOT/ITL/E2E, goodput)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_bench_args(s)
    s.set_defaults(func=_cmd_bench_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_bench_args(p)
    return _cmd_bench_serve(p.parse_args(argv))
