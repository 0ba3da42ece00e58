#!/usr/bin/env bash
# Creates the TPU VM (a single host or a pod slice). Not run in CI.
#   bash scripts/tpu_vm/create.sh [--dry-run]
set -euo pipefail
. "$(dirname "$0")/env.sh" "$@"
run_or_print gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION"
