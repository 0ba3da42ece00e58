#!/usr/bin/env bash
# Launches a job on every host of the slice (each host runs examples/multihost_launch.py).
#   bash scripts/tpu_vm/launch.sh train [--dry-run] [--config experiments/internlm2_7b_full_sft.py] [--workdir gs://b/run]
#   bash scripts/tpu_vm/launch.sh long-context [--dry-run] [--tokens 200000] [--mesh fsdp=2,context=8]
# Without gcloud (e.g. on a laptop or in CI) it is a dry run: it prints what it would do.
set -euo pipefail
job="${1:-}"; shift || true
. "$(dirname "$0")/env.sh" "$@"
config="experiments/internlm2_7b_full_sft.py"; workdir="gs://my-bucket/jaxlm-run"
tokens=200000; mesh=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --mesh) mesh="$2"; shift 2 ;;
    --dry-run) shift ;;
    *) echo "launch.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$job" in
  train)
    cmd="cd $JAXLM_DIR && python examples/multihost_launch.py --config $config --workdir $workdir --set model.name=$CKPT_DIR --mesh ${mesh:-fsdp=-1}" ;;
  long-context)
    cmd="cd $JAXLM_DIR && python examples/multihost_launch.py --model $CKPT_DIR --prompt-tokens $tokens --mesh ${mesh:-fsdp=2,context=-1}" ;;
  *)
    echo "usage: launch.sh train|long-context [--dry-run] [options]" >&2; exit 2 ;;
esac
echo "job: $job on $TPU_NAME ($ACCELERATOR_TYPE, zone $ZONE); every host runs: $cmd"
on_all_hosts "$cmd"
