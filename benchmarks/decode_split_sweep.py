"""Sweep of the paged decode kernel's split policy (MIN_SPLIT, BLOCK_N) at Llama-3.1-8B attention
shapes, on one GPU: time per call of split kernel + reduce, replayed from a CUDA graph of 32 calls
(back to back, as in a decode step's graph), grid sized for max_model_len like the engine's graphs.

    python benchmarks/decode_split_sweep.py [--max-model-len 2048] [--out sweep.json]

Why: at bs1 with a short context, one split per sequence leaves 8 of 132 SMs busy walking the
context serially (~7 us per layer at ~200 tokens on an H200); finer splits shorten that chain at the
price of more partials for the reduce.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.kernels.paged_decode_attention import paged_decode_attention

HQ, HKV, D, BS = 32, 8, 128, 16


def time_config(B: int, S: int, max_model_len: int, min_split: int, block_n: int, max_splits: int) -> float:
    dev = torch.device("cuda")
    nblk = -(-S // BS)
    num_blocks = B * nblk + 1
    k = torch.randn(num_blocks, BS, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = (torch.randperm(num_blocks - 1, device=dev)[:B * nblk] + 1).view(B, nblk).to(torch.int32)
    seq = torch.full((B,), S, dtype=torch.int32, device=dev)
    q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kw = {"max_splits": max_splits, "min_split": min_split, "block_n": block_n}
    paged_decode_attention(q, k, v, bt, seq, D ** -0.5, max_model_len, out=out, **kw)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(32):
            paged_decode_attention(q, k, v, bt, seq, D ** -0.5, max_model_len, out=out, **kw)
    return do_bench(g.replay, warmup=25, rep=200) * 1e3 / 32  # us per call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for B in (1, 4, 16, 64):
        for S in (128, 256, 512, 1024, 2048):
            base = None
            line = []
            for min_split, block_n, max_splits in ((256, 64, 16), (128, 64, 16), (64, 64, 16), (64, 32, 16),
                                                    (32, 32, 16), (64, 64, 32), (32, 32, 32)):
                us = time_config(B, S, args.max_model_len, min_split, block_n, max_splits)
                base = base or us
                rows.append({"B": B, "S": S, "min_split": min_split, "block_n": block_n, "max_splits": max_splits,
                             "us": us})
                line.append(f"{min_split}/{block_n}/{max_splits}: {us:5.1f}")
            print(f"B={B:3d} S={S:5d}  " + "  ".join(line), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
                       "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                       "max_model_len": args.max_model_len,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
