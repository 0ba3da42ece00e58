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
# part 1: kernels (correctness, then timings against cuDNN and XLA); part 2: a 7B-shaped
# model at 32K-200K tokens. Each part prints its table; both tables are repeated last.
status=0
timeout 300 python benchmarks/gpu/suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/run_all.log" || status=1
timeout 170 python benchmarks/gpu/long_context.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/run_all.log" || status=1
echo
cat "$OUT/summary.txt" "$OUT/long_context_summary.txt" 2>/dev/null || true
exit $status
