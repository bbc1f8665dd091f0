#!/usr/bin/env bash
# One batched device run (see /work/.library/device): GPU tests, then the offline GPU benchmarks.
# Usage on the device machine: bash scripts/gpu_session.sh  (results copied to $OUT)
set -u
export PYTHONPATH=$PWD
python -m pip install -q --no-deps .whl/gpu/*.whl 2>&1 | grep -v -i warn | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu -x 2>&1 | tail -15
timeout 150 python benchmarks/gpu_offline.py --config benchmarks/configs/smollm2-135m-instruct.json 2>&1 | grep -v Warning | tail -14
timeout 200 python benchmarks/gpu_offline.py --config benchmarks/configs/llama-3.1-8b-instruct.json --skip-eager 2>&1 | grep -v Warning | tail -10
mkdir -p "$OUT/results" && cp benchmarks/results/gpu_offline_* "$OUT/results/" 2>/dev/null
