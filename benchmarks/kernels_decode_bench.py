"""Micro-benchmark: paged decode attention at Llama-3.1-8B attention shapes (bf16), on one GPU.

    python benchmarks/kernels_decode_bench.py [--out results.json]

For batch 64 at context 1024 and 4096 (block size 16, shuffled block ids) it times, by median of
triton.testing.do_bench (CUDA events) over replays of a CUDA graph of 10 calls:
  - the Triton split-KV decode kernel (engine_core/kernels/paged_decode_attention.py), with its
    default split policy, a grid sized for max_model_len = 131072 (the CUDA-graph case), and a few
    tuning variants;
  - the torch reference paged_attention_ref (block-table gather + SDPA; gather indices cached on
    the metadata as the engine does once per step);
  - torch SDPA on a dense, padded [B, Hkv, S, D] layout (no paging): enable_gqa, and the "query
    heads as rows" form (q viewed as [B, Hkv, G, D], no mask), which lets the flash kernel read
    each K/V head once.
Bytes: the KV read, B * S * Hkv * D * 2 (K and V) * 2 bytes - the floor; achieved GB/s = bytes / t,
against a measured device-to-device copy (read + write) and the H100 datasheet 3.35 TB/s.
Also a prefill point (4 prompts x 2048 tokens) vs SDPA's causal flash kernel, in TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.kernels.paged_decode_attention import paged_decode_attention
from engine_core.kernels.paged_prefill_attention import paged_prefill_attention
from engine_core.layers.attention import paged_attention_ref
from engine_core.layers.attention_metadata import AttentionMetadata

HQ, HKV, D, BS = 32, 8, 128, 16
DEV = torch.device("cuda")


def bench(fn, reps_in_graph: int = 10) -> float:
    """Median ms per call. The calls are captured in a CUDA graph (as the engine replays decode
    steps) so Python launch overhead, which dominates small launches, stays out; falls back to
    timing eager calls if the function cannot be captured."""
    fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps_in_graph):
                fn()
        return do_bench(g.replay, warmup=25, rep=100, return_mode="median") / reps_in_graph
    except Exception as e:  # noqa: BLE001
        print(f"(graph capture failed: {type(e).__name__}; timing eager calls)", flush=True)
        return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3) / 1e9  # GB/s, read + write


def decode_point(B: int, S: int, rows: list, copy_gbs: float, variants: bool = True) -> None:
    g = torch.Generator(device=DEV).manual_seed(S)
    nblk = S // BS
    num_blocks = B * nblk + 1
    cache = torch.randn(2, num_blocks, BS, HKV, D, device=DEV, generator=g).to(torch.bfloat16)
    bt = (torch.randperm(num_blocks - 1, device=DEV, generator=g) + 1).to(torch.int32).view(B, nblk)
    seq_lens = torch.full((B,), S, dtype=torch.int32, device=DEV)
    q = torch.randn(B, HQ, D, device=DEV, generator=g).to(torch.bfloat16)
    scale = D ** -0.5
    md = AttentionMetadata(slot_mapping=torch.zeros(B, dtype=torch.long, device=DEV),
                           query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=DEV), seq_lens=seq_lens,
                           block_tables=bt, block_size=BS, max_query_len=1, max_seq_len=S,
                           query_lens_cpu=[1] * B, seq_lens_cpu=[S] * B, num_decodes=B)
    kv_bytes = B * S * HKV * D * 2 * 2
    ref = paged_attention_ref(q.float(), cache.float(), md, scale)
    md.derived.clear()

    def add(name, ms, out=None):
        err = None if out is None else float((out.double() - ref.double()).norm() / ref.double().norm())
        gbs = kv_bytes / (ms * 1e-3) / 1e9
        rows.append({"B": B, "ctx": S, "impl": name, "ms": ms, "kv_GBps": gbs, "pct_of_copy": 100 * gbs / copy_gbs,
                     "pct_of_3350": 100 * gbs / 3350, "rel_err_vs_fp32_ref": err})

    def ours(**kw):
        return paged_decode_attention(q, cache[0], cache[1], bt, seq_lens, scale, kw.pop("max_seq_len", S), **kw)

    add("triton split-KV (default)", bench(ours), ours())
    add("triton, grid for max_model_len=131072", bench(lambda: ours(max_seq_len=131072)), ours(max_seq_len=131072))
    for kw in ({"min_split": 128}, {"min_split": 512}, {"min_split": 1 << 20}, {"block_n": 32},
               {"block_n": 128}, {"num_stages": 3}, {"num_warps": 8}) if variants else \
            ({"min_split": 512}, {"min_split": 1 << 20}):
        add(f"triton {kw}", bench(lambda kw=kw: ours(**kw)), ours(**kw))
    add("torch ref (gather+SDPA)", bench(lambda: paged_attention_ref(q, cache, md, scale)),
        paged_attention_ref(q, cache, md, scale))
    # dense padded layout, no paging (what a non-paged engine would read)
    kd = cache[0][bt.long()].reshape(B, S, HKV, D).transpose(1, 2).contiguous()
    vd = cache[1][bt.long()].reshape(B, S, HKV, D).transpose(1, 2).contiguous()
    q4 = q.unsqueeze(2)
    add("SDPA dense enable_gqa", bench(lambda: F.scaled_dot_product_attention(q4, kd, vd, scale=scale, enable_gqa=True)),
        F.scaled_dot_product_attention(q4, kd, vd, scale=scale, enable_gqa=True).squeeze(2))
    qg = q.view(B, HKV, HQ // HKV, D)
    add("SDPA dense, q heads as rows", bench(lambda: F.scaled_dot_product_attention(qg, kd, vd, scale=scale)),
        F.scaled_dot_product_attention(qg, kd, vd, scale=scale).view(B, HQ, D))


def prefill_point(rows: list, nreq: int = 4, L: int = 2048) -> None:
    nblk = L // BS
    num_blocks = nreq * nblk + 1
    g = torch.Generator(device=DEV).manual_seed(0)
    cache = torch.randn(2, num_blocks, BS, HKV, D, device=DEV, generator=g).to(torch.bfloat16)
    bt = (torch.randperm(num_blocks - 1, device=DEV, generator=g) + 1).to(torch.int32).view(nreq, nblk)
    q = torch.randn(nreq * L, HQ, D, device=DEV, generator=g).to(torch.bfloat16)
    qsl = torch.arange(0, nreq * L + 1, L, dtype=torch.int32, device=DEV)
    seq_lens = torch.full((nreq,), L, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    flops = nreq * 4 * HQ * D * L * L / 2  # causal: half of QK^T and PV
    kd = cache[0][bt.long()].reshape(nreq, L, HKV, D).transpose(1, 2).contiguous()
    vd = cache[1][bt.long()].reshape(nreq, L, HKV, D).transpose(1, 2).contiguous()
    qd = q.view(nreq, L, HQ, D).transpose(1, 2)
    ref = F.scaled_dot_product_attention(qd.float(), kd.float(), vd.float(), is_causal=True, scale=D ** -0.5,
                                         enable_gqa=True).transpose(1, 2).reshape(nreq * L, HQ, D)
    for bm, bn in ((64, 64), (128, 64), (128, 32)):
        def run(bm=bm, bn=bn):
            return paged_prefill_attention(q, cache[0], cache[1], bt, seq_lens, qsl, 0, nreq, L, D ** -0.5, out,
                                           block_m=bm, block_n=bn)
        ms = bench(run)
        o = run()
        err = float((o.double() - ref.double()).norm() / ref.double().norm())
        rows.append({"impl": f"prefill triton BLOCK_M={bm} BLOCK_N={bn}", "ms": ms, "TFLOPs": flops / ms / 1e9,
                     "rel_err_vs_fp32_ref": err})
    ms = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=D ** -0.5, enable_gqa=True))
    rows.append({"impl": "prefill SDPA causal dense (enable_gqa)", "ms": ms, "TFLOPs": flops / ms / 1e9})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"device-to-device copy {copy_gbs:.0f} GB/s (read+write)", flush=True)
    rows: list = []
    for S in (1024, 4096):
        decode_point(64, S, rows, copy_gbs)
    for B, S in ((1, 1024), (1, 4096), (8, 4096)):
        decode_point(B, S, rows, copy_gbs, variants=False)
    prefill_point(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "copy_GBps": copy_gbs, "rows": rows}, f, indent=1)
    for r in rows:
        if "ctx" in r:
            err = r["rel_err_vs_fp32_ref"]
            print(f"B={r['B']:3d} ctx={r['ctx']:5d} {r['impl']:44s} {r['ms'] * 1e3:9.1f} us "
                  f"{r['kv_GBps']:7.0f} GB/s {r['pct_of_copy']:5.1f}% of copy {r['pct_of_3350']:5.1f}% of 3.35TB/s"
                  + (f"  err {err:.1e}" if err is not None else ""))
        else:
            print(f"{r['impl']:54s} {r['ms'] * 1e3:9.1f} us {r['TFLOPs']:6.1f} TFLOP/s"
                  + (f"  err {r['rel_err_vs_fp32_ref']:.1e}" if "rel_err_vs_fp32_ref" in r else ""))


if __name__ == "__main__":
    main()
