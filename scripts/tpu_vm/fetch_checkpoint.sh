#!/usr/bin/env bash
# Puts the HF checkpoint on every host (each host then reads only its own slices of it).
#   bash scripts/tpu_vm/fetch_checkpoint.sh [--dry-run]            # from the Hugging Face hub
#   CKPT_GCS=gs://bucket/internlm2-chat-7b bash scripts/tpu_vm/fetch_checkpoint.sh   # or from GCS
set -euo pipefail
. "$(dirname "$0")/env.sh" "$@"
if [ -n "${CKPT_GCS:-}" ]; then
  on_all_hosts "mkdir -p $CKPT_DIR && gsutil -m cp -r '$CKPT_GCS/*' $CKPT_DIR/"
else
  on_all_hosts "pip install -q huggingface_hub && huggingface-cli download $HF_MODEL --local-dir $CKPT_DIR"
fi
