"""KV-cache utilisation: the same request mix served with (a) contiguous max-length preallocation
per sequence (what HF `generate` with a static cache, FasterTransformer or Orca-style servers do)
and (b) pagedserve's paged BlockManager - at the same KV memory. A pure CPU simulation of the
scheduler's memory decisions (no model, seconds to run).

    python benchmarks/kv_utilisation.py [--num-requests 1000] [--kv-tokens 65536] [--max-model-len 2048]

The mix is the ShareGPT-like conversation distribution of `pagedserve bench serve` (lognormal input
and output lengths; means about 165 in / 330 out). Every request arrives at t=0 (a saturated
server); admission is FCFS. One simulated step = one engine iteration: an admitted request
prefills its prompt in its first step and samples a token, then decodes one token per step until
it has its output length, then frees its memory.

Schemes, all with --kv-tokens token slots of KV memory:
- naive (max length): each running sequence reserves --max-model-len contiguous slots up front
  (it cannot know its output length);
- naive (prompt + max_tokens): reserves exactly prompt + max_tokens slots, as if every client set
  max_tokens to the true output length (an optimistic oracle; external fragmentation ignored);
- paged: the real `engine_core.block_manager.BlockManager` - allocate_slots as the prompt is
  prefilled and as each token is decoded, free when done; a decode that finds no free block
  preempts the most recently admitted request (recompute, back to the front of the queue) and a
  step that preempted admits nobody, as engine_core/scheduler.py does (chunked prefill and the
  token budget are left out: memory is what this measures);
- paged (watermark 1 %): the same, but admitting only while 1 % of the blocks stay free afterwards
  (vLLM v0's default): far fewer preemptions (recomputes) for about the same concurrency.

Reported per scheme: peak and mean running sequences, % of allocated slots holding live tokens
(KV actually written) over time, steps to finish the mix, preemptions. Writes
benchmarks/results/kv_utilisation_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.serve_bench import conversation_lengths
from engine_core.block_manager import BlockManager
from engine_core.request import Request
from engine_core.sampling_params import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_mix(n: int, seed: int, max_model_len: int, input_median: float = 100.0, output_median: float = 200.0,
             sigma: float = 1.0) -> list[tuple[int, int]]:
    return conversation_lengths(n, seed, input_median, output_median, sigma, max_input=max_model_len,
                                max_output=max_model_len, max_model_len=max_model_len)


class Timeline:
    """Per step: running sequences, live KV tokens, allocated slots (summaries + a thinned series)."""

    def __init__(self, kv_tokens: int) -> None:
        self.kv_tokens = kv_tokens
        self.running: list[int] = []
        self.live: list[int] = []
        self.allocated: list[int] = []
        self.saturated: list[bool] = []  # requests were still waiting (steady state)

    def record(self, running: int, live: int, allocated: int, waiting: int) -> None:
        self.running.append(running)
        self.live.append(live)
        self.allocated.append(allocated)
        self.saturated.append(waiting > 0)

    def summary(self, name: str, preemptions: int = 0, max_points: int = 600) -> dict:
        steps = len(self.running)
        util = [lv / a if a else 0.0 for lv, a in zip(self.live, self.allocated)]
        busy = [i for i in range(steps) if self.running[i] > 0]
        sat = [i for i in busy if self.saturated[i]] or busy
        stride = max(1, steps // max_points)
        idx = list(range(0, steps, stride))
        return {
            "scheme": name,
            "steps": steps,
            "peak_running": max(self.running, default=0),
            "mean_running": sum(self.running[i] for i in busy) / max(1, len(busy)),
            "mean_running_saturated": sum(self.running[i] for i in sat) / max(1, len(sat)),
            # token-weighted: total live token-steps / total allocated slot-steps
            "live_slot_fraction": sum(self.live) / max(1, sum(self.allocated)),
            "live_slot_fraction_saturated": sum(self.live[i] for i in sat) / max(1, sum(self.allocated[i] for i in sat)),
            "mean_step_utilisation": sum(util[i] for i in busy) / max(1, len(busy)),
            "mean_memory_allocated_fraction": sum(self.allocated[i] for i in busy) / max(1, len(busy)) / self.kv_tokens,
            "preemptions": preemptions,
            "series": {"step": idx, "running": [self.running[i] for i in idx],
                       "live_fraction_of_allocated": [round(util[i], 4) for i in idx],
                       "allocated_fraction_of_memory": [round(self.allocated[i] / self.kv_tokens, 4) for i in idx]},
        }


def simulate_contiguous(mix: list[tuple[int, int]], kv_tokens: int, reserve, name: str,
                        max_num_seqs: int = 100_000) -> dict:
    """Each admitted sequence holds `reserve(prompt, output)` slots until it finishes."""
    waiting = collections.deque(range(len(mix)))
    running: dict[int, int] = {}  # request -> tokens in KV
    reserved = 0
    tl = Timeline(kv_tokens)
    while waiting or running:
        while waiting and len(running) < max_num_seqs and reserved + reserve(*mix[waiting[0]]) <= kv_tokens:
            i = waiting.popleft()
            reserved += reserve(*mix[i])
            running[i] = 0
        if not running:
            raise ValueError(f"request {waiting[0]} needs {reserve(*mix[waiting[0]])} slots > KV memory {kv_tokens}")
        done = []
        for i, held in running.items():
            p, o = mix[i]
            # this step computes the prompt (first step) or the last sampled token: KV grows to
            # p (+ tokens decoded so far); the step samples one more token
            held = p if held == 0 else held + 1
            running[i] = held
            if held - p + 1 >= o:
                done.append(i)
        tl.record(len(running), sum(running.values()), reserved, len(waiting))
        for i in done:
            reserved -= reserve(*mix[i])
            del running[i]
    return tl.summary(name)


def simulate_paged(mix: list[tuple[int, int]], kv_tokens: int, block_size: int = 16, max_num_seqs: int = 100_000,
                   watermark: float = 0.0) -> dict:
    """FCFS over the real BlockManager (prefix caching off: the prompts share nothing). `watermark`:
    admit only while that fraction of the blocks stays free afterwards (vLLM v0's 1 %; 0: admit
    while anything fits, as engine_core/scheduler.py and vLLM v1 do)."""
    reserve_blocks = int(watermark * (kv_tokens // block_size))
    bm = BlockManager(kv_tokens // block_size + 1, block_size, enable_prefix_caching=False)  # +1: null block
    reqs = [Request(str(i), [0] * p, SamplingParams(max_tokens=o, ignore_eos=True)) for i, (p, o) in enumerate(mix)]
    waiting = collections.deque(reqs)
    running: list[Request] = []  # admission order (Request compares by value: use ids for membership)
    preempted: set[str] = set()
    preemptions = 0
    tl = Timeline(kv_tokens)
    while waiting or running:
        # decode: every running request needs a slot for the token it sampled last step
        scheduled: list[Request] = []
        preempted.clear()
        for req in running[:]:  # a copy: preemption pops from `running` inside the loop
            if req.request_id in preempted:
                continue  # preempted for an older request this step
            while bm.allocate_slots(req, 1) is None:
                victim = running.pop()  # the most recently admitted
                bm.free(victim)
                victim.num_computed_tokens = 0
                waiting.appendleft(victim)
                preempted.add(victim.request_id)
                preemptions += 1
                if victim is req:
                    break
            else:
                scheduled.append(req)
        # admission, FCFS: prefill the whole (prompt + tokens kept across a preemption); none in a
        # step that had to preempt (it would only thrash), as engine_core/scheduler.py does
        admitted: list[Request] = []
        while waiting and len(running) < max_num_seqs and not preempted:
            req = waiting[0]
            need = -(-req.num_tokens // block_size)
            if bm.num_free_blocks - need < reserve_blocks or bm.allocate_slots(req, req.num_tokens) is None:
                break
            waiting.popleft()
            running.append(req)
            admitted.append(req)
        if not running:
            raise ValueError(f"request {waiting[0].request_id} does not fit in {kv_tokens} KV slots")
        for req in scheduled:
            req.num_computed_tokens += 1
        for req in admitted:
            req.num_computed_tokens = req.num_tokens
        live = sum(r.num_computed_tokens for r in running)
        tl.record(len(running), live, bm.num_used_blocks * block_size, len(waiting))
        still = []
        for req in running:
            req.output_token_ids.append(0)  # the token this step samples
            if len(req.output_token_ids) >= req.sampling_params.max_tokens:
                bm.free(req)
            else:
                still.append(req)
        running = still
    return tl.summary("paged" + (f" (watermark {watermark:.0%})" if watermark else ""), preemptions)


def run(num_requests: int = 1000, kv_tokens: int = 65536, max_model_len: int = 2048, block_size: int = 16,
        seed: int = 0, input_median: float = 100.0, output_median: float = 200.0, sigma: float = 1.0,
        watermarks: tuple[float, ...] = (0.01,)) -> dict:
    mix = make_mix(num_requests, seed, max_model_len, input_median, output_median, sigma)
    t0 = time.perf_counter()
    schemes = [
        simulate_contiguous(mix, kv_tokens, lambda p, o: max_model_len, "naive (max length)"),
        simulate_contiguous(mix, kv_tokens, lambda p, o: p + o, "naive (prompt + max_tokens, oracle)"),
        simulate_paged(mix, kv_tokens, block_size),
        *(simulate_paged(mix, kv_tokens, block_size, watermark=w) for w in watermarks if w > 0),
    ]
    naive, paged = schemes[0], schemes[2]
    return {
        "mix": {"num_requests": num_requests, "mean_input": sum(p for p, _ in mix) / len(mix),
                "mean_output": sum(o for _, o in mix) / len(mix), "max_input": max(p for p, _ in mix),
                "max_output": max(o for _, o in mix)},
        "config": {"kv_tokens": kv_tokens, "max_model_len": max_model_len, "block_size": block_size, "seed": seed,
                   "input_median": input_median, "output_median": output_median, "sigma": sigma},
        "schemes": schemes,
        "paged_vs_naive": {
            "peak_running_ratio": paged["peak_running"] / max(1, naive["peak_running"]),
            "mean_running_saturated_ratio": paged["mean_running_saturated"] / max(1e-9, naive["mean_running_saturated"]),
            "steps_ratio_naive_over_paged": naive["steps"] / max(1, paged["steps"]),
        },
        "simulation_s": time.perf_counter() - t0,
    }


def plot(res: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#999999", "#d9a441", "#3b7dd8", "#2a9d8f", "#6a4c93"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [2, 2, 1.3]})
    for k, (s, c) in enumerate(zip(res["schemes"], colors)):
        x = s["series"]["step"]
        style = {"color": c, "lw": 1.2} if k < 3 else {"color": c, "lw": 1.0, "ls": "--"}
        axes[0].plot(x, [100 * v for v in s["series"]["live_fraction_of_allocated"]],
                     label=f"{s['scheme']}: {100 * s['live_slot_fraction_saturated']:.1f}%", **style)
        axes[1].plot(x, s["series"]["running"], label=f"{s['scheme']}: peak {s['peak_running']}, "
                     f"{s['preemptions']} preemptions", **style)
    axes[0].set_title("allocated KV slots holding live tokens (%)")
    axes[0].set_ylim(0, 105)
    axes[1].set_title("running sequences (same KV memory)")
    for ax in axes[:2]:
        ax.set_xlabel("engine step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is axes[0] else "upper right")
    short = {"naive (max length)": "naive\nmax length", "naive (prompt + max_tokens, oracle)": "naive\noracle"}
    names = [short.get(s["scheme"], s["scheme"].replace(" (", "\n(")) for s in res["schemes"]]
    bars = axes[2].bar(names, [s["mean_running_saturated"] for s in res["schemes"]], color=colors)
    for b, s in zip(bars, res["schemes"]):
        axes[2].text(b.get_x() + b.get_width() / 2, b.get_height(), f"{s['mean_running_saturated']:.0f} seqs\n"
                     f"{100 * s['live_slot_fraction_saturated']:.0f}% live", ha="center", va="bottom", fontsize=7)
    axes[2].set_title("mean running sequences while saturated")
    axes[2].tick_params(axis="x", labelsize=7)
    axes[2].set_ylim(0, max(s["mean_running_saturated"] for s in res["schemes"]) * 1.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--kv-tokens", type=int, default=65536, help="KV memory in token slots (default 65536)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--input-median", type=float, default=100.0)
    ap.add_argument("--output-median", type=float, default=200.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--watermarks", default="0.01",
                    help="extra paged runs that admit only while this fraction of blocks stays free (comma list; "
                         "'' for none)")
    ap.add_argument("--results-dir", default=RESULTS)
    args = ap.parse_args(argv)

    res = run(args.num_requests, args.kv_tokens, args.max_model_len, args.block_size, args.seed,
              args.input_median, args.output_median, args.sigma,
              tuple(float(w) for w in args.watermarks.split(",") if w.strip()))
    mix = res["mix"]
    print(f"{mix['num_requests']} requests, mean {mix['mean_input']:.0f} in / {mix['mean_output']:.0f} out; "
          f"KV memory {args.kv_tokens} token slots; max_model_len {args.max_model_len}; block size {args.block_size}")
    print(f"{'scheme':<38} {'peak seq':>8} {'mean seq*':>10} {'live/alloc*':>14} {'live/alloc':>14} {'steps':>8} "
          f"{'preempt':>8}")
    for s in res["schemes"]:
        print(f"{s['scheme']:<38} {s['peak_running']:>8d} {s['mean_running_saturated']:>10.1f} "
              f"{100 * s['live_slot_fraction_saturated']:>13.1f}% {100 * s['live_slot_fraction']:>13.1f}% "
              f"{s['steps']:>8d} {s['preemptions']:>8d}")
    r = res["paged_vs_naive"]
    print(f"* while requests were waiting (saturated). paged vs naive (max length): "
          f"{r['peak_running_ratio']:.1f}x peak sequences, {r['mean_running_saturated_ratio']:.1f}x mean, "
          f"{r['steps_ratio_naive_over_paged']:.1f}x fewer steps; simulated in {res['simulation_s']:.1f}s")

    date = dt.date.today().isoformat()
    res["meta"] = {"date": date, "device": f"cpu simulation, no model ({platform.processor() or platform.machine()})",
                   "command": " ".join(["python", "benchmarks/kv_utilisation.py", *(sys.argv[1:] if argv is None else argv)])}
    os.makedirs(args.results_dir, exist_ok=True)
    base = os.path.join(args.results_dir, f"kv_utilisation_{date}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, base + ".png", f"KV utilisation at {args.kv_tokens} token slots, {mix['num_requests']} conversation-like "
         f"requests (mean {mix['mean_input']:.0f} in / {mix['mean_output']:.0f} out), max_model_len "
         f"{args.max_model_len}, block {args.block_size} · {date}")
    print(f"wrote {base}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
