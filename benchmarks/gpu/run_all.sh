#!/usr/bin/env bash
# The project's GPU suite (one H200, under 10 minutes): kernel correctness on the real GPU,
# then timings against cuDNN and XLA, a 7B-shaped model at long context, and the serving
# engine at concurrency 1/16/64; each part prints its table, and all are repeated last.
#   bash benchmarks/gpu/run_all.sh                     # on the GPU machine; logs under $OUT
#   bash benchmarks/gpu/run_all.sh --dry-run           # here on CPU: interpret mode, tiny sizes
#   PARTS=kernels,serving bash benchmarks/gpu/run_all.sh   # a subset (e.g. to split the run in two calls)
# The parts' limits add up to 620 s, past one device call's 600 s: on the lent machine run it as two
# back-to-back calls (the machine stays warm between them): PARTS=kernels,long_context (360 s),
# then PARTS=serving,quant_decode (260 s), each with its own OUT.
# The serving part detokenizes with the real InternLM2 tokenizer: $JAXLM_SHARED/tokenizers/internlm2
# (default ../shared); on the device machine, carry a copy and point JAXLM_SHARED at it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$(pwd)/gpu-suite-out}"
PARTS="${PARTS:-kernels,long_context,serving,quant_decode}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# one device, no preallocation games: the suite measures its own peaks
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true; } > "$OUT/gpu_info.txt"
status=0
: > "$OUT/run_all.log"
# The limits are the GPU's; a dry run on a CPU (interpret mode, compiles on 2 cores) gets 5x.
SCALE=1
[[ " $* " == *" --dry-run "* ]] && SCALE=5
part() {  # part NAME TIMEOUT_S SCRIPT: runs one part if PARTS names it
    [[ ",$PARTS," == *",$1,"* ]] || return 0
    timeout "$(( $2 * SCALE ))" python "$3" --out "$OUT" "${ARGS[@]}" 2>&1 | tee -a "$OUT/run_all.log" || status=1
}
ARGS=("$@")
part kernels 220 benchmarks/gpu/suite.py
part long_context 140 benchmarks/gpu/long_context.py
part serving 140 benchmarks/gpu/serving.py
part quant_decode 120 benchmarks/gpu/quant_decode.py
echo
cat "$OUT"/summary.txt "$OUT"/long_context_summary.txt "$OUT"/serving_summary.txt "$OUT"/quant_decode_summary.txt 2>/dev/null || true
exit $status
