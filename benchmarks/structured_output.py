"""Structured output cost: throughput with 0 %, 50 % and 100 % of requests under a JSON-schema
grammar, and grammar compile time (cold and cached), in-process (EngineCore closed loop).

    python benchmarks/structured_output.py [--model default|PATH|dummy:DIR --tokenizer DIR]
        [--concurrency 32] [--num-requests 96] [--max-tokens 64] [--device auto]

On the device (random weights, no GGUF): first `python benchmarks/structured_output.py
--export-tokenizer DIR` here (the embedded SmolLM2's tokenizer as an HF directory), carry DIR, and
run with `--model dummy:benchmarks/configs/<config>.json --tokenizer DIR` (a model with a larger
vocabulary simply never gets the ids the tokenizer lacks).

The peer is the same engine in the same run with no constrained requests (0 %); the ratio is the
throughput kept. Every request produces exactly --max-tokens tokens: free ones ignore EOS, and the
constrained ones follow a schema (an array of 40 short strings) that is longer than --max-tokens,
so the comparison is per token at equal work. Step stalls: the same 50 % run again while a worker
thread compiles fresh schemas (as the scheduler service does when requests arrive); the step-time
percentiles of both runs are reported. Writes benchmarks/results/structured_output_<device>_<date>.json/.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.grpc_overhead import closed_loop
from engine_core.config import EngineConfig
from engine_core.engine_core import EngineCore
from engine_core.executor import make_executor
from engine_core.sampling_params import SamplingParams
from engine_core.structured_output.params import StructuredOutputsParams
from engine_core.tokenizer import load_engine_tokenizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LONG_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 40, "maxItems": 40}


def acceptance_schema(i: int) -> dict:
    """A distinct schema per i (cold compiles): nested object, bounded ints, enums, arrays, optional fields."""
    return {"type": "object", "properties": {
        f"name_{i}": {"type": "string", "maxLength": 24},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "number": {
            "type": "integer", "minimum": 1, "maximum": 999 + i}}, "required": ["city"]},
        "mood": {"type": "string", "enum": ["happy", "sad", f"v{i}"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "score": {"type": "number", "minimum": 0, "maximum": 5}},
        "required": [f"name_{i}", "address", "mood"]}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else 0.0


class HostTimers:
    """Wall time spent in the engine's host-side calls (wraps the bound methods)."""

    NAMES = (("scheduler", "schedule"), ("scheduler", "fill_grammar_bitmasks"), ("scheduler", "update_from_output"),
             ("executor", "submit"), ("executor", "provide_bitmasks"), ("executor", "get_result"))

    def __init__(self, core: EngineCore) -> None:
        self.totals: dict[str, float] = {}
        for owner, name in self.NAMES:
            obj = getattr(core, owner)
            fn = getattr(obj, name)

            def timed(*a, _fn=fn, _key=name, **kw):
                t = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    self.totals[_key] = self.totals.get(_key, 0.0) + time.perf_counter() - t
            setattr(obj, name, timed)

    def take(self, steps: int) -> dict[str, float]:
        out = {f"{k}_ms_per_step": 1e3 * v / max(steps, 1) for k, v in self.totals.items()}
        self.totals = {}
        return out


def run_mix(core: EngineCore, prompts, frac: float, max_tokens: int, concurrency: int, tag: str,
            background=None, timers: HostTimers | None = None) -> dict:
    n_con = round(frac * len(prompts))
    free = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    con = SamplingParams(temperature=0, max_tokens=max_tokens,
                         structured_outputs=StructuredOutputsParams(json=LONG_SCHEMA))
    # Interleaved, so a 50 % run has constrained and free requests in every batch.
    params = [con if (i * n_con) // len(prompts) != ((i + 1) * n_con) // len(prompts) else free
              for i in range(len(prompts))]
    steps: list[float] = []
    stop = threading.Event()
    thread = None
    if background is not None:
        thread = threading.Thread(target=background, args=(stop,), daemon=True)
        thread.start()
    t0 = time.perf_counter()
    traces = closed_loop(core, prompts, params, concurrency, tag, on_step=steps.append)
    wall = time.perf_counter() - t0
    stop.set()
    if thread is not None:
        thread.join()
    toks = sum(len(t.token_ids) for t in traces)
    res = {"constrained_fraction": frac, "requests": len(prompts), "output_tokens": toks, "wall_s": wall,
           "output_tok_s": toks / wall, "steps": len(steps), "step_ms_p50": 1e3 * percentile(steps, 0.5),
           "step_ms_p99": 1e3 * percentile(steps, 0.99), "step_ms_max": 1e3 * max(steps)}
    if timers is not None:
        res["host_breakdown"] = timers.take(len(steps))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (needed for dummy: models)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cold-schemas", type=int, default=20)
    ap.add_argument("--fill-threads", type=int, default=None, help="bitmask fill threads (default: xgrammar's auto)")
    ap.add_argument("--no-async-scheduling", action="store_true", help="one step in flight (the sync peer)")
    ap.add_argument("--breakdown", action="store_true", help="time the engine's host-side calls per step")
    ap.add_argument("--export-tokenizer", metavar="DIR", default=None,
                    help="write the embedded SmolLM2 tokenizer to DIR (for dummy: runs elsewhere) and exit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.export_tokenizer:
        load_engine_tokenizer(EngineConfig(tokenizer="default")).hf.save_pretrained(args.export_tokenizer)
        print(f"wrote {args.export_tokenizer}")
        return 0

    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, device=args.device, max_model_len=1024,
                          max_num_seqs=max(args.concurrency, 1))
    executor = make_executor(config)
    tokenizer = load_engine_tokenizer(config, executor)
    core = EngineCore(config, executor, tokenizer=tokenizer)
    if args.no_async_scheduling:
        core.max_in_flight = 1
    info = core.info
    subjects = ["a librarian", "a pilot", "a chef", "a gardener", "a painter", "a nurse", "a sailor", "a baker"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"List words about {subjects[i % 8]} "
                                               f"number {i} as a JSON array."}], tokenize=True)
               for i in range(args.num_requests)]

    # Compile time: cold (distinct schemas) and cached (the same ones again).
    comp = core.grammar_compiler
    cold, cached = [], []
    for i in range(args.cold_schemas):
        t = time.perf_counter()
        comp.compile(StructuredOutputsParams(json=acceptance_schema(i)))
        cold.append(time.perf_counter() - t)
    for i in range(args.cold_schemas):
        t = time.perf_counter()
        comp.compile(StructuredOutputsParams(json=acceptance_schema(i)))
        cached.append(time.perf_counter() - t)
    compile_res = {"cold_ms_median": 1e3 * statistics.median(cold), "cold_ms_max": 1e3 * max(cold),
                   "cached_us_median": 1e6 * statistics.median(cached)}
    print(f"compile: cold median {compile_res['cold_ms_median']:.2f} ms (max {compile_res['cold_ms_max']:.2f}), "
          f"cached {compile_res['cached_us_median']:.1f} us")

    if args.fill_threads is not None:
        from engine_core.structured_output.request_grammar import BitmaskFiller

        core.scheduler._bitmask_filler = BitmaskFiller(max_threads=args.fill_threads)
    run_mix(core, prompts[: args.concurrency], 1.0, 8, args.concurrency, "warm")  # warm-up
    timers = HostTimers(core) if args.breakdown else None
    if timers is not None:
        timers.take(1)
    runs = [run_mix(core, prompts, f, args.max_tokens, args.concurrency, f"f{f}", timers=timers)
            for f in (0.0, 0.5, 1.0)]
    base = runs[0]["output_tok_s"]
    for r in runs:
        r["ratio_vs_unconstrained"] = r["output_tok_s"] / base
        print(f"{int(100 * r['constrained_fraction']):3d}% constrained: {r['output_tok_s']:8.1f} tok/s "
              f"({r['ratio_vs_unconstrained']:.3f}x of 0%)  step p50 {r['step_ms_p50']:.1f} ms  "
              f"p99 {r['step_ms_p99']:.1f} ms")
        if "host_breakdown" in r:
            print("      host ms/step: " + ", ".join(f"{k.replace('_ms_per_step', '')} {v:.2f}"
                                                    for k, v in r["host_breakdown"].items()))

    counter = [0]

    def compile_fresh(stop: threading.Event) -> None:
        i = 10_000
        while not stop.is_set():
            comp.compile(StructuredOutputsParams(json=acceptance_schema(i)))
            counter[0] += 1
            i += 1
            time.sleep(0.05)

    stalls = run_mix(core, prompts, 0.5, args.max_tokens, args.concurrency, "stall", background=compile_fresh)
    stalls["background_compiles"] = counter[0]
    print(f"50% with {counter[0]} compiles in a worker thread: step p50 {stalls['step_ms_p50']:.1f} ms "
          f"p99 {stalls['step_ms_p99']:.1f} ms max {stalls['step_ms_max']:.1f} ms "
          f"(without: p99 {runs[1]['step_ms_p99']:.1f} max {runs[1]['step_ms_max']:.1f})")

    device = info.device
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    result = {"benchmark": "structured_output", "date": date, "device": device, "host": platform.node(),
              "cpu_threads": os.cpu_count(), "load_average": os.getloadavg(), "model": info.model_name,
              "dtype": info.dtype,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "compile": compile_res,
              "runs": runs, "stall_probe": stalls,
              "peer": "the same engine, same run, 0 % constrained (ratio_vs_unconstrained)"}
    slug = "cpu" if info.device == "cpu" else device.lower().replace(" ", "-")
    out = args.out or os.path.join(RESULTS, f"structured_output_{slug}_{date}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ax[0].bar([f"{int(100 * r['constrained_fraction'])}%" for r in runs], [r["output_tok_s"] for r in runs])
        ax[0].set_title(f"output tok/s at concurrency {args.concurrency}")
        ax[0].set_xlabel("requests under a JSON-schema grammar")
        ax[1].bar(["p50", "p99", "max"], [runs[1]["step_ms_p50"], runs[1]["step_ms_p99"], runs[1]["step_ms_max"]],
                  width=0.35, label="50% constrained")
        ax[1].bar([0.35, 1.35, 2.35], [stalls["step_ms_p50"], stalls["step_ms_p99"], stalls["step_ms_max"]],
                  width=0.35, label="+ compiles in a worker thread")
        ax[1].set_title("step time (ms)")
        ax[1].legend()
        fig.suptitle(f"structured output — {device}, {info.model_name}, {date}")
        fig.tight_layout()
        fig.savefig(out.replace(".json", ".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {out}")
    core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
