#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py says what it measures): about 5 minutes on
# one H100/H200, stopped at 8. Where there is no CUDA device it says so and exits 0.
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
exec timeout 480 "$python" benchmarks/gpu_check.py "$@"
