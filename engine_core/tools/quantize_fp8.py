"""Offline fp8 quantization with GPTQ rounding, written as a checkpoint `--quantization fp8` serves.

    python -m engine_core.tools.quantize_fp8 --model MODEL --output DIR [--calibration-text FILE]

MODEL is anything `--model` takes (a .gguf file, an HF directory; default: the embedded SmolLM2).
The model runs in fp32 on `--device` over the calibration text (default: a few KB of varied English
prose, engine_core/data/calibration_text.txt), every linear layer but the LM head is rounded to
e4m3 by GPTQ with the per-output-channel scales of `--quantization fp8` (amax / 448), and DIR gets
model.safetensors (e4m3 weights + weight_scale; the rest in --dtype), config.json with
quantization_config {"quant_method": "fp8", "activation_scheme": "dynamic"} and the tokenizer.
Serve it with `--model DIR --quantization fp8` (see docs/fp8.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from engine_core.layers.gptq_fp8 import GptqConfig
from engine_core.layers.gptq_model import Fp8Weights, gptq_fp8_model
from engine_core.loader import fp8_checkpoint, load_model, resolve_dtype, resolve_model
from engine_core.tokenizer import load_tokenizer

DEFAULT_CALIBRATION_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                        "calibration_text.txt")
logger = logging.getLogger(__name__)


def quantize_fp8(model: str | None, output_dir: str, calibration_text: str = DEFAULT_CALIBRATION_TEXT, *,
                 device: str = "cpu", dtype: str = "bfloat16", sequence_length: int = 512,
                 config: GptqConfig | None = None) -> Fp8Weights:
    """GPTQ-quantize `model` to fp8 and write the checkpoint to `output_dir`; returns the weights."""
    source = resolve_model(model)
    tokenizer = load_tokenizer(source.path)
    with open(calibration_text, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    sequences = [ids[i:i + sequence_length] for i in range(0, len(ids), sequence_length)]
    net = load_model(source, "float32", device)
    t0 = time.perf_counter()
    weights = gptq_fp8_model(net, sequences, config)
    logger.info("GPTQ over %d calibration tokens in %.1fs", len(ids), time.perf_counter() - t0)
    net.to(resolve_dtype(dtype, torch.device(device)))
    if source.kind == "hf":
        with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
            hf_config = json.load(f)
    else:
        hf_config = source.config.to_hf_config()
    hf_config["torch_dtype"] = str(net.lm_head.weight.dtype).removeprefix("torch.")
    fp8_checkpoint.save(net, weights, hf_config, output_dir)
    tokenizer.hf.save_pretrained(output_dir)
    return weights


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--output", required=True, help="directory for the fp8 checkpoint")
    ap.add_argument("--calibration-text", default=DEFAULT_CALIBRATION_TEXT,
                    help="UTF-8 text the layers are calibrated on (not your evaluation text)")
    ap.add_argument("--device", default="cpu", help="where calibration runs (cpu, cuda)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the tensors that stay unquantized (embedding, norms, LM head)")
    ap.add_argument("--sequence-length", type=int, default=512, help="calibration tokens per sequence")
    ap.add_argument("--damp", type=float, default=GptqConfig.damp, help="Hessian dampening, fraction of its mean diagonal")
    ap.add_argument("--no-act-order", action="store_true", help="round columns in their order, not by H_jj")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quantize_fp8(args.model, args.output, args.calibration_text, device=args.device, dtype=args.dtype,
                 sequence_length=args.sequence_length,
                 config=GptqConfig(damp=args.damp, act_order=not args.no_act_order))
    print(f"wrote {args.output}: serve it with --model {args.output} --quantization fp8")


if __name__ == "__main__":
    main()
