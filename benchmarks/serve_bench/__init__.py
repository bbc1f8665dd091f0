"""`pagedserve bench serve`, the online serving benchmark (usage: benchmarks/serve_bench/cli.py).

datasets: the prompts; stream: one streamed request; metrics: a run's numbers; run: one run;
report: table and plots; driver: the sweep and its files; cli: the flags and subcommand.
Packaged with the wheel, so the subcommand works from an install, not only from a checkout.
"""
from benchmarks.serve_bench.cli import (
    add_bench_parser,
    add_serve_bench_args,
    bench_args,
    main,
)
from benchmarks.serve_bench.datasets import (
    BenchRequest,
    conversation_lengths,
    sample_conversation,
    sample_random,
)
from benchmarks.serve_bench.driver import run_benchmark
from benchmarks.serve_bench.metrics import (
    METRICS,
    calculate_metrics,
    parse_goodput,
    tpot_of,
)
from benchmarks.serve_bench.report import plot_latency, plot_sweep, print_run
from benchmarks.serve_bench.run import run_once
from benchmarks.serve_bench.stream import (
    RequestResult,
    StreamParser,
    build_body,
    send_request,
)

__all__ = [
    "METRICS", "BenchRequest", "RequestResult", "StreamParser", "add_bench_parser", "add_serve_bench_args",
    "bench_args", "build_body", "calculate_metrics", "conversation_lengths", "main", "parse_goodput",
    "plot_latency", "plot_sweep", "print_run", "run_benchmark", "run_once", "sample_conversation",
    "sample_random", "send_request", "tpot_of",
]
