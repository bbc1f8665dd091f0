"""Speculative decoding: single-stream speed with n-gram (prompt lookup) speculation on a workload
whose answers copy spans of the prompt, against the same engine with speculation off (same run);
and, on a GPU, the cost of verifying k drafts per step.

    # CPU, real SmolLM2 (embedded GGUF): spec off vs ngram k=2, k=4, single stream
    python benchmarks/spec_decode.py [--ks 2 4] [--max-tokens 160] [--num-prompts 4] [--cpu-threads N]

    # GPU, random weights: step time of verifying k = 2, 4, 8 forced drafts at batch 1 / 16 / 64
    python benchmarks/spec_decode.py --model dummy:benchmarks/configs/llama-3.1-8b-instruct.json \\
        --verify-cost --ks 2 4 8 --batch-sizes 1 16 64

Copy workload: chat prompts asking to annotate / edit / fix / quote a given code, JSON or text, so
the greedy answer repeats spans of the prompt (what prompt lookup is for); answers end at EOS (or
--max-tokens), the same length in every configuration since greedy output is identical. Every configuration
decodes the same prompts greedily; the script checks that the tokens are identical (speculation
must not change greedy output) and reports output tok/s (wall time of the whole request, TTFT
included), TPOT ((end - first token) / (tokens - 1)), acceptance rate (accepted / proposed drafts)
and mean acceptance length (tokens per verification), plus the ratio to the spec-off peer.

--verify-cost (for random weights, where nothing would be accepted): the proposer is replaced by
one that always drafts k tokens (the last token repeated), so every decode step verifies k drafts;
with ~0 % acceptance each step emits one token per request, so the step time against the spec-off
peer (CUDA graphs + async scheduling, same run) is the price of verification, and
step_ms(k) / step_ms(off) is the mean acceptance length a real draft needs to break even.

Writes benchmarks/results/spec_decode_<device>_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from engine_core.config import EngineConfig
from engine_core.engine_core import EngineCore
from engine_core.executor import make_executor
from engine_core.sampling_params import SamplingParams
from engine_core.spec_decode.ngram_proposer import NgramProposer
from engine_core.tokenizer import load_engine_tokenizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

PASSAGE = ("The library opens at nine in the morning and closes at six in the evening. Members may borrow "
           "up to five books at a time for three weeks. Late returns cost ten cents per day per book. "
           "The reading room on the second floor is reserved for quiet study, and phones must be kept on "
           "silent there. Children under twelve must be accompanied by an adult.")
CODE = ("def area(width, height):\n    return width * height\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n\n"
        "def describe(width, height):\n    print('area', area(width, height))\n"
        "    print('perimeter', perimeter(width, height))\n")
JSON_DOC = ('{"name": "Ada Lovelace", "born": 1815, "city": "London", "languages": ["English", "French"], '
            '"fields": ["mathematics", "computing"], "notes": "wrote the first published algorithm"}')
BUGGY = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
         "    retrun total / len(values)\n\n"
         "def variance(values):\n    m = mean(values)\n    return sum((v - m) ** 2 for v in values) / len(values)\n")
COPY_PROMPTS = [
    f"Add a docstring to each function of this Python code and return the whole code:\n\n{CODE}",
    f"Return this JSON unchanged except that \"city\" becomes \"Paris\":\n\n{JSON_DOC}",
    f"Fix the typo in this code and return the full corrected code:\n\n{BUGGY}",
    f"Copy the following notice exactly, word for word, then add one sentence summarising it:\n\n{PASSAGE}",
]


class ForcedDrafts(NgramProposer):
    """--verify-cost: always k drafts (the last token repeated), whatever the context."""

    def propose(self, tokens: np.ndarray, max_tokens: int | None = None) -> list[int]:
        k = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        return [int(tokens[-1])] * max(k, 0)


def make_core(args, spec: dict | None) -> EngineCore:
    config = EngineConfig(model=args.model, device=args.device, max_model_len=args.max_model_len,
                          max_num_seqs=max(args.batch_sizes + [1]), kv_cache_memory_gb=args.kv_cache_gb,
                          speculative_config=spec, enforce_eager=args.enforce_eager, cpu_threads=args.cpu_threads)
    executor = make_executor(config)
    core = EngineCore(config, executor, tokenizer=load_engine_tokenizer(config, executor))
    return core


def close_core(core: EngineCore) -> None:
    core.shutdown()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_batch(core: EngineCore, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = True) -> dict:
    """Run prompts together to completion (greedy; up to max_tokens, or exactly with ignore_eos)."""
    c0 = (core.counters.spec_decode_num_draft_tokens, core.counters.spec_decode_num_accepted_tokens,
          core.counters.spec_decode_num_drafts)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    t0 = time.perf_counter()
    ids = []
    for i, p in enumerate(prompts):
        rid = f"b{time.monotonic_ns()}-{i}"
        core.add_request(rid, p, sp)
        ids.append(rid)
    tokens = {r: [] for r in ids}
    first: dict[str, float] = {}
    end: dict[str, float] = {}
    step_times, steps_all_decoding = [], []
    while core.has_unfinished_requests():
        ts = time.perf_counter()
        deltas = core.step()
        now = time.perf_counter()
        for d in deltas:
            if d.new_token_ids:
                first.setdefault(d.request_id, now)
                tokens[d.request_id] += d.new_token_ids
            if d.finished:
                end[d.request_id] = now
        if len(first) == len(ids) and len(end) < len(ids):
            steps_all_decoding.append(now - ts)
        step_times.append(now - ts)
    wall = time.perf_counter() - t0
    n_out = sum(len(t) for t in tokens.values())
    drafts = core.counters.spec_decode_num_draft_tokens - c0[0]
    accepted = core.counters.spec_decode_num_accepted_tokens - c0[1]
    verifs = core.counters.spec_decode_num_drafts - c0[2]
    tpot = [(end[r] - first[r]) / max(1, len(tokens[r]) - 1) for r in ids]
    return {"tokens": [tokens[r] for r in ids], "wall_s": wall, "output_tokens": n_out,
            "output_tok_s": n_out / wall, "ttft_s": statistics.mean(first[r] - t0 for r in ids),
            "tpot_ms": 1e3 * statistics.mean(tpot),
            "decode_step_ms": 1e3 * statistics.median(steps_all_decoding) if steps_all_decoding else None,
            "num_steps": len(step_times), "draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_acceptance_length": 1 + accepted / verifs if verifs else None}


def copy_workload(args) -> dict:
    ks = args.ks
    configs: list[tuple[str, dict | None]] = [("off", None)] + [
        (f"ngram k={k}", {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": args.lookup_max,
                          "prompt_lookup_min": args.lookup_min}) for k in ks]
    # Every engine is loaded first and the prompts are run round-robin over them, so a load change
    # on a shared machine hits every configuration alike (the ratios are what matters).
    cores = [make_core(args, spec) for _, spec in configs]
    tok = cores[0].tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
               for p in COPY_PROMPTS[: args.num_prompts]]
    for core in cores:
        run_batch(core, prompts[:1], 8)  # warm-up
    per_prompt: list[list[dict]] = [[] for _ in configs]
    for rep in range(args.repeats):
        for i, p in enumerate(prompts):
            for c, core in enumerate(cores):
                r = run_batch(core, [p], args.max_tokens, ignore_eos=False)  # single stream, ends at EOS
                per_prompt[c].append(r)
                print(f"  [{rep}] prompt {i} {configs[c][0]:>10}: {r['output_tok_s']:6.1f} tok/s", flush=True)
    for core in cores:
        close_core(core)
    runs = []
    for (name, spec), rs in zip(configs, per_prompt):
        wall = sum(r["wall_s"] for r in rs)
        n_out = sum(r["output_tokens"] for r in rs)
        drafts = sum(r["draft_tokens"] for r in rs)
        acc = sum(r["accepted_tokens"] for r in rs)
        lens = [r["mean_acceptance_length"] for r in rs if r["mean_acceptance_length"]]
        runs.append({"config": name, "speculative_config": spec, "output_tok_s": n_out / wall,
                     "tpot_ms": statistics.mean(r["tpot_ms"] for r in rs),
                     "ttft_s": statistics.mean(r["ttft_s"] for r in rs),
                     "acceptance_rate": acc / drafts if drafts else None,
                     "mean_acceptance_length": statistics.mean(lens) if lens else None,
                     "draft_tokens": drafts, "accepted_tokens": acc,
                     "per_prompt_tok_s": [r["output_tok_s"] for r in rs],
                     "tokens": [r["tokens"][0] for r in rs]})
    base = runs[0]
    for r in runs:
        r["ratio_vs_off"] = r["output_tok_s"] / base["output_tok_s"]
        r["tpot_ratio_vs_off"] = base["tpot_ms"] / r["tpot_ms"]
        r["greedy_identical_to_off"] = r["tokens"] == base["tokens"]
        acc = "" if r["acceptance_rate"] is None else (
            f"  acceptance {100 * r['acceptance_rate']:.1f} %  mean acc. length {r['mean_acceptance_length']:.2f}")
        print(f"{r['config']:>10}: {r['output_tok_s']:7.1f} tok/s  TPOT {r['tpot_ms']:6.1f} ms  "
              f"{r['ratio_vs_off']:.2f}x of off (peer {base['output_tok_s']:.1f} tok/s, same run)"
              f"{acc}  identical: {r['greedy_identical_to_off']}")
    if args.tokens_in_json is False:
        for r in runs:
            r.pop("tokens")
    return {"mode": "copy_workload_single_stream", "max_tokens": args.max_tokens,
            "prompts": COPY_PROMPTS[: args.num_prompts], "runs": runs,
            "peer": "the same engine with speculation off, same run (ratio_vs_off)"}


def verify_cost(args) -> dict:
    rng = np.random.default_rng(0)
    results = []
    kmax = max(args.ks)
    prompts_all = [rng.integers(100, 20000, size=args.prompt_len).tolist() for _ in range(max(args.batch_sizes))]
    core = make_core(args, None)
    base = {}
    run_batch(core, prompts_all[:1], 8)
    for bs in args.batch_sizes:
        r = run_batch(core, prompts_all[:bs], args.max_tokens)
        base[bs] = r
        print(f"off   bs={bs:3d}: decode step {r['decode_step_ms']:.2f} ms, {r['output_tok_s']:.1f} tok/s")
        results.append({"k": 0, "batch_size": bs, **{k: v for k, v in r.items() if k != "tokens"}})
    close_core(core)
    core = None  # free the peer's weights and KV before the next engine loads
    gc.collect()
    core = make_core(args, {"method": "ngram", "num_speculative_tokens": kmax})
    runner = core.executor.runner
    run_batch(core, prompts_all[:1], 8)
    for k in args.ks:
        runner.ngram = ForcedDrafts(k)
        for bs in args.batch_sizes:
            r = run_batch(core, prompts_all[:bs], args.max_tokens)
            r = {k2: v for k2, v in r.items() if k2 != "tokens"}
            r["step_ratio_vs_off"] = r["decode_step_ms"] / base[bs]["decode_step_ms"]
            results.append({"k": k, "batch_size": bs, **r})
            print(f"k={k:<3} bs={bs:3d}: decode step {r['decode_step_ms']:.2f} ms = {r['step_ratio_vs_off']:.2f}x "
                  f"of off ({base[bs]['decode_step_ms']:.2f} ms, same run): break-even at mean acceptance "
                  f"length {r['step_ratio_vs_off']:.2f} (max {k + 1}); acceptance here "
                  f"{100 * (r['acceptance_rate'] or 0):.1f} %")
    close_core(core)
    return {"mode": "verify_cost_forced_drafts", "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
            "runs": results,
            "peer": "spec off (CUDA graphs + async scheduling), same run; step_ratio_vs_off = break-even "
                    "mean acceptance length"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="draft lengths (default 2 4; 2 4 8 with --verify-cost)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 160 (copy), 64 (--verify-cost)")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the prompts (copy workload)")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=1)
    ap.add_argument("--verify-cost", action="store_true", help="forced drafts: the price of verifying k per step")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="default 0.25 on CPU, 8 on GPU")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--cpu-threads", type=int, default=None, help="intra-op threads on CPU (default: all available)")
    ap.add_argument("--tokens-in-json", action="store_true", help="keep the generated token ids in the JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        import torch

        on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    except ImportError:
        on_cuda = False
    if args.kv_cache_gb is None:
        args.kv_cache_gb = 8.0 if on_cuda else 0.25
    if args.ks is None:
        args.ks = [2, 4, 8] if args.verify_cost else [2, 4]
    if args.max_tokens is None:
        args.max_tokens = 64 if args.verify_cost else 160
    if not args.verify_cost:
        args.batch_sizes = [1]
    result = verify_cost(args) if args.verify_cost else copy_workload(args)

    device = "cpu"
    if on_cuda:
        import torch

        device = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    model = os.path.basename(str(args.model or "smollm2-135m-instruct-q4_1")).removesuffix(".json")
    result.update({"benchmark": "spec_decode", "date": date, "device": device, "host": platform.node(),
                   "cpu_threads": os.cpu_count(), "load_average": os.getloadavg(), "model": model,
                   "command": " ".join([os.path.basename(sys.executable)] + sys.argv)})
    slug = "cpu" if device == "cpu" else device.lower().replace(" ", "-")
    tag = "_verify_cost" if args.verify_cost else ""
    out = args.out or os.path.join(RESULTS, f"spec_decode{tag}_{slug}_{model}_{date}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        runs = result["runs"]
        if args.verify_cost:
            fig, ax = plt.subplots(figsize=(7, 4))
            for bs in args.batch_sizes:
                pts = sorted((r["k"], r["decode_step_ms"]) for r in runs if r["batch_size"] == bs)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {bs}")
            ax.set_xlabel("draft tokens verified per request per step (0: spec off, graphs + async)")
            ax.set_ylabel("decode step (ms)")
            ax.legend()
            ax.set_title(f"verification cost — {device}, {model}, {date}")
        else:
            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            names = [r["config"] for r in runs]
            ax[0].bar(names, [r["output_tok_s"] for r in runs])
            for i, r in enumerate(runs):
                ax[0].text(i, r["output_tok_s"], f"{r['ratio_vs_off']:.2f}x", ha="center", va="bottom")
            ax[0].set_title("single-stream output tok/s (copy workload)")
            ax[1].bar(names, [r["tpot_ms"] for r in runs])
            for i, r in enumerate(runs):
                if r["acceptance_rate"] is not None:
                    ax[1].text(i, r["tpot_ms"], f"acc {100 * r['acceptance_rate']:.0f}%", ha="center", va="bottom")
            ax[1].set_title("TPOT (ms)")
            fig.suptitle(f"n-gram speculative decoding — {device}, {model}, {date}")
        fig.tight_layout()
        fig.savefig(out.replace(".json", ".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
