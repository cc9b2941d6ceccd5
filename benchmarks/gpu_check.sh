#!/usr/bin/env bash
# The one-shot GPU check: benchmarks/gpu_check.py (throughput, memory, host syncs, Ray Train),
# then benchmarks/efficiency.py on CUDA (FLOP/s and share of peak per stage, fp32 and bf16).
# About 6 minutes on one H100/H200, stopped at 9. Where there is no CUDA device it says so and
# exits 0.
#
#   bash benchmarks/gpu_check.sh [--smoke]      (--smoke: check the script itself on the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
if [[ ! -x $python ]]; then
    if ! command -v nvidia-smi > /dev/null && [[ " $* " != *" --smoke "* ]]; then
        echo "no CUDA device (no nvidia-smi): nothing to measure"
        exit 0
    fi
    make .venv/.installed-demo
fi
timeout 420 "$python" benchmarks/gpu_check.py "$@"
if [[ " $* " == *" --smoke "* ]]; then
    exec timeout 120 "$python" benchmarks/efficiency.py --device cpu --hidden-layers 1
fi
exec timeout 120 "$python" benchmarks/efficiency.py --device cuda
