#!/usr/bin/env bash
# Installs JAX for TPU and jaxlm on every host of the slice.
#   bash scripts/tpu_vm/setup.sh [--dry-run]
set -euo pipefail
. "$(dirname "$0")/env.sh" "$@"
on_all_hosts "pip install -U 'jax[tpu]' && (test -d $JAXLM_DIR || git clone $JAXLM_REPO $JAXLM_DIR) && pip install -e $JAXLM_DIR"
