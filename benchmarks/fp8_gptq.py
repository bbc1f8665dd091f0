"""GPTQ vs round-to-nearest fp8 weights: SmolLM2's perplexity (docs/fp8.md, Quality).

Every linear layer but the LM head goes to e4m3 with per-output-channel scales (amax / 448), either
rounded to nearest (what `--quantization fp8` does at load time) or by GPTQ calibrated on
engine_core/data/calibration_text.txt (never the test text); perplexity on
tests/data/perplexity_text.txt through the layer's torch twins on CPU, weight-only (decode) and w8a8
(prefill), exactly as tests/unit/test_quantization.py measures it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fp8_gptq.py [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from engine_core.layers import fp8_linear
from engine_core.layers.gptq_fp8 import GptqConfig
from engine_core.layers.gptq_model import gptq_fp8_model, swap_in_fp8
from engine_core.layers.quantization import quantize_model
from engine_core.loader import load_model, resolve_model
from engine_core.perplexity import perplexity
from engine_core.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TEXT = os.path.join(ROOT, "tests", "data", "perplexity_text.txt")
CALIBRATION_TEXT = os.path.join(ROOT, "engine_core", "data", "calibration_text.txt")
CPU = torch.device("cpu")


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def both_paths(model: torch.nn.Module, ids: list[int]) -> dict[str, float]:
    out = {}
    for path, rows in (("weight-only", 1 << 30), ("w8a8", 0)):
        fp8_linear.WEIGHT_ONLY_MAX_ROWS = rows
        out[path] = perplexity(model, ids)
    fp8_linear.WEIGHT_ONLY_MAX_ROWS = 16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=512, help="calibration tokens per sequence")
    ap.add_argument("--variants", default="rtn,gptq,gptq-no-act-order")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp8_linear.check_fp8_supported = lambda device: None  # fp8 numerics through the CPU twins

    source = resolve_model(None)
    tok = load_tokenizer(source.path)
    with open(TEST_TEXT) as f:
        ids = tok.encode(f.read())
    with open(CALIBRATION_TEXT) as f:
        calib = chunks(tok.encode(f.read()), args.chunk)
    model = load_model(source, "float32", "cpu")
    base = perplexity(model, ids)
    print(f"fp32: {base:.4f}  ({len(ids)} test tokens, {sum(map(len, calib))} calibration tokens)", flush=True)

    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        if variant != "rtn":
            weights = gptq_fp8_model(m, calib, GptqConfig(act_order=variant == "gptq"))
            swap_in_fp8(m, weights, torch.float32)
        quantize_model(m, "fp8", CPU, torch.float32)  # the rest (embedding int8; RTN for "rtn")
        t1 = time.perf_counter()
        for path, p in both_paths(m, ids).items():
            print(f"{variant:20s} {path:12s} {p:8.4f} {100 * (p / base - 1):+6.2f} %", flush=True)
        print(f"{variant:20s} quantized in {t1 - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
