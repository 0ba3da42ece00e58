#!/usr/bin/env bash
# The project's GPU suite (one H200, at most 8 minutes): kernel correctness on the
# real GPU, then timings against cuDNN and XLA; the short table prints last.
#   bash benchmarks/gpu/run_all.sh            # on the GPU machine; logs under $OUT
#   bash benchmarks/gpu/run_all.sh --dry-run  # here on CPU: interpret mode, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$(pwd)/gpu-suite-out}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# one device, no preallocation games: the suite measures its own peaks
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true; } > "$OUT/gpu_info.txt"
timeout 480 python benchmarks/gpu/suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/run_all.log"
