#!/usr/bin/env bash
# Train RealisID on a Cloud TPU pod slice: the same `realisid train` on every worker (one process per
# host, all chips of the slice in one mesh). See launch/README.md.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [--config.x=y ...]
#
# Environment (all optional):
#   PROJECT   gcloud project (default: gcloud's configured project)
#   CONFIG    config file, relative to REPO_DIR (default configs/sdxl.py)
#   MESH      mesh shape (data, fsdp, tensor) (default "(1,-1,1)": FSDP over every chip)
#   REPO_DIR  checkout of realisid-jax with its .venv on every worker (default ~/realisid-jax)
#   TOPOLOGY  the slice's TPU topology (e.g. v5e:2x4 for a v5litepod-8): before launching, the training step
#             is compiled for it here (`realisid info --train --topology`, the TPU compiler's per-chip plan;
#             needs this checkout's .venv with the tpu extra) and nothing is launched if it does not fit
#   DRY_RUN=1 print the gcloud command instead of running it
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
shift 3
CONFIG=${CONFIG:-configs/sdxl.py}
MESH=${MESH:-(1,-1,1)}
REPO_DIR=${REPO_DIR:-'~/realisid-jax'}

# Every worker must see the same WORKDIR (orbax writes one checkpoint from all hosts): use a gs:// bucket.
if [[ $WORKDIR != gs://* ]]; then
  echo "warning: WORKDIR '$WORKDIR' is not a gs:// path; each worker would write its own local copy" >&2
fi

# REALISID_DISTRIBUTED=1 makes `realisid train` call jax.distributed.initialize(), which on Cloud TPU finds
# the coordinator, the process count and this worker's index from the TPU metadata server by itself.
remote="cd ${REPO_DIR} && REALISID_DISTRIBUTED=1 .venv/bin/realisid train"
remote+=" --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")"
remote+=" $(printf '%q' "--config.mesh.shape=${MESH}")"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done

plan=()
if [[ -n ${TOPOLOGY:-} ]]; then
  overrides=()  # the plan takes the config overrides only, not train's --data, --pretrained, ...
  for arg in "$@"; do
    if [[ $arg == --config.* ]]; then
      overrides+=("$arg")
    fi
  done
  plan=("$(dirname "$0")/../.venv/bin/realisid" info --train --topology "$TOPOLOGY" --config "$CONFIG"
        "--config.mesh.shape=${MESH}" ${overrides[@]+"${overrides[@]}"})
fi
source "$(dirname "$0")/on_workers.sh"
run_on_workers "the training step does not fit a ${TOPOLOGY:-} chip (plan above)"
