#!/usr/bin/env bash
# Device run for issue 6's benchmark: offline_throughput parts 1-3 + a decode profile.
set -u
export PYTHONPATH=$PWD
python -m pip install -q --no-deps .whl/gpu/*.whl 2>&1 | grep -v -i warn | tail -2
timeout 320 python benchmarks/offline_throughput.py --parts 1 --tag _part1 2>&1 | grep -v -i warn | tail -12
timeout 250 python benchmarks/offline_throughput.py --parts 2,3 --profile --tag _llama8b 2>&1 | grep -v -i warn | tail -60
mkdir -p "$OUT/results" && cp benchmarks/results/offline_throughput_* "$OUT/results/" 2>/dev/null
