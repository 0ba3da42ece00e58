# Settings shared by the TPU VM scripts; override any of them in the environment.
: "${TPU_NAME:=jaxlm-v5p-32}"
: "${ZONE:=us-east5-a}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || true)}"
[ -n "$PROJECT" ] || PROJECT=my-project
: "${ACCELERATOR_TYPE:=v5p-32}"            # a pod slice: 16 chips on 4 hosts
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"     # the TPU VM image (see `gcloud compute tpus versions list`)
: "${JAXLM_REPO:=https://github.com/jaxlm/jaxlm.git}"
: "${JAXLM_DIR:=\$HOME/jaxlm}"            # on the hosts
: "${HF_MODEL:=internlm/internlm2-chat-7b}"
: "${CKPT_DIR:=\$HOME/ckpt/internlm2-chat-7b}"

# run_or_print CMD...: runs the command, or prints it under --dry-run / DRY_RUN=1 / no gcloud.
DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY_RUN=1; done
if ! command -v gcloud >/dev/null 2>&1; then DRY_RUN=1; fi
run_or_print() {
  if [ "$DRY_RUN" = "1" ]; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
# on_all_hosts COMMAND: the same shell command on every host of the slice, at once.
on_all_hosts() {
  run_or_print gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --worker=all --command "$1"
}
