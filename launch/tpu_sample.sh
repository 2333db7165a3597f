#!/usr/bin/env bash
# Sample a request file on every chip of a Cloud TPU pod slice: the same `realisid sample-batch` on every
# worker (one process per host, all chips of the slice in one data-parallel mesh). See docs/sampling.md.
#
#   launch/tpu_sample.sh TPU_NAME ZONE REQUESTS.jsonl OUT_DIR [--base DIR --branches DIR ...] [--config.x=y ...]
#
# Environment (all optional):
#   PROJECT   gcloud project (default: gcloud's configured project)
#   CONFIG    config file, relative to REPO_DIR (default configs/sdxl.py)
#   MESH      mesh shape (data, fsdp, tensor) (default "(-1,1,1)": one image per chip per batch)
#   REPO_DIR  checkout of realisid-jax with its .venv on every worker (default ~/realisid-jax)
#   TOPOLOGY  the slice's TPU topology (e.g. v5e:2x4): before launching, sampling is compiled for it here
#             (`realisid info --sample --topology`, the TPU compiler's per-chip plan; needs this checkout's
#             .venv with the tpu extra) and its plan printed
#   DRY_RUN=1 print the gcloud command instead of running it
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 REQUESTS=$3 OUT=$4
shift 4
CONFIG=${CONFIG:-configs/sdxl.py}
MESH=${MESH:-(-1,1,1)}
REPO_DIR=${REPO_DIR:-'~/realisid-jax'}

# Each image is written by the worker whose chips made it: OUT should be one folder every worker sees (a
# shared disk or a gcsfuse mount), or the images end up spread over the workers' disks.
# REALISID_DISTRIBUTED=1 makes `realisid sample-batch` call jax.distributed.initialize(), which on Cloud TPU
# finds the coordinator, the process count and this worker's index from the TPU metadata server by itself.
remote="cd ${REPO_DIR} && REALISID_DISTRIBUTED=1 .venv/bin/realisid sample-batch"
remote+=" --config $(printf '%q' "$CONFIG") --requests $(printf '%q' "$REQUESTS") --out $(printf '%q' "$OUT")"
remote+=" $(printf '%q' "--config.mesh.shape=${MESH}")"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done

plan=("$(dirname "$0")/../.venv/bin/realisid" info --sample --topology "${TOPOLOGY:-}" --config "$CONFIG")
source "$(dirname "$0")/on_workers.sh"
run_on_workers "sampling could not be planned for ${TOPOLOGY:-} (above)"
