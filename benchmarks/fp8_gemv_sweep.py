"""FP8 weight-only decode GEMM (engine_core/kernels/fp8_gemv.py) vs bf16 `F.linear` and vs the
w8a8 `torch._scaled_mm` path, per Llama-3.1-8B linear shape and batch size, on one GPU.

    python benchmarks/fp8_gemv_sweep.py [--sweep]

Each measurement replays a CUDA graph over as many distinct weight copies as fill >= 1 GiB, so the
weights stream from HBM (not from L2) and launch latency is amortised as in a decode graph. Reports
us per layer call and the weight bytes/s reached; `--sweep` also tries a grid of tile configs and
prints the best per shape (what `pick_config` encodes). Writes $OUT or benchmarks/results/
fp8_gemv_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.kernels.fp8_gemv import fp8_w8a16, pick_config
from engine_core.kernels.fp8_quant import per_token_quant_fp8
from engine_core.layers.fp8_linear import fp8_weight_only_ref, quantize_fp8_per_channel

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (name, N, K) of Llama-3.1-8B's linears (qkv and gate_up fused as the engine fuses them).
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]


def time_graph(fns: list, iters: int = 20) -> float:
    """Mean seconds per element of `fns`, replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters / len(fns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--sweep-configs", choices=["all", "reduce"], default="all")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = [int(r) for r in args.rows.split(",")]
    out = []
    for name, N, K in SHAPES:
        copies = max(2, min(64, (1 << 30) // (N * K)))
        w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q = [quantize_fp8_per_channel(w) for w in w16]
        qw = [a for a, _ in q]
        qs = [b for _, b in q]
        qwt = [a.t() for a in qw]
        for M in rows:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = fp8_weight_only_ref(x, qw[0], qs[0], None)
            got = fp8_w8a16(x, qw[0], qs[0], None)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            t_bf16 = time_graph([lambda w=w, x=x: F.linear(x, w) for w in w16])

            def scaled(x, wt, s):
                xq, xs = per_token_quant_fp8(x)
                return torch._scaled_mm(xq, wt, scale_a=xs, scale_b=s[None, :], out_dtype=torch.bfloat16)
            t_sm = time_graph([lambda x=x, wt=wt, s=s: scaled(x, wt, s) for wt, s in zip(qwt, qs)])
            t_fp8 = time_graph([lambda x=x, w=w, s=s: fp8_w8a16(x, w, s, None) for w, s in zip(qw, qs)])
            row = {"layer": name, "N": N, "K": K, "M": M, "config": list(pick_config(M, N, K, sms)),
                   "bf16_us": t_bf16 * 1e6, "scaled_mm_us": t_sm * 1e6, "w8a16_us": t_fp8 * 1e6,
                   "w8a16_weight_GBps": N * K / t_fp8 / 1e9, "bf16_weight_GBps": 2 * N * K / t_bf16 / 1e9,
                   "rel_err_vs_ref": err}
            if args.sweep and M in (1, 2, 4, 8):
                best = None
                reduce_cfgs = itertools.product([1], [4, 8, 16, 32], [1024, 2048], [1, 2, 4], [4, 8], [1])
                dot_cfgs = itertools.product([16], [32, 64, 128], [256, 512], [1, 2, 4, 8], [4, 8], [3, 5])
                if args.sweep_configs == "reduce":
                    dot_cfgs = []
                for bm, bn, bk, sk, nw, ns in itertools.chain(reduce_cfgs if M <= 4 else [], dot_cfgs):
                    if bm == 1 and bn * bk > 32768:
                        continue
                    cfg = (bm, bn, bk, sk, nw, ns)
                    try:
                        t = time_graph([lambda x=x, w=w, s=s, cfg=cfg: fp8_w8a16(x, w, s, None, cfg)
                                        for w, s in zip(qw, qs)], 5)
                    except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory, registers)
                        print(f"config {cfg} skipped: {type(e).__name__}", flush=True)
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                row["sweep_best_us"], row["sweep_best_config"] = best[0] * 1e6, list(best[1])
            print(json.dumps(row), flush=True)
            out.append(row)
        w16.clear()
        q.clear()
        torch.cuda.empty_cache()
    date = dt.date.today().isoformat()
    name = torch.cuda.get_device_name().replace(" ", "-").lower()
    path = os.path.join(os.environ.get("OUT", RESULTS), f"fp8_gemv_{name}_{date}.json")
    with open(path, "w") as f:
        json.dump({"meta": {"date": date, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "command": " ".join(["python"] + sys.argv)}, "results": out}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
