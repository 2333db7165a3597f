#!/usr/bin/env bash
# Train RealisID on one GPU host: a single process drives all local GPUs (one mesh, FSDP over them),
# bfloat16 compute with float32 master weights, cuDNN attention. See launch/README.md.
#
#   launch/multi_gpu.sh WORKDIR [--config.x=y ...]
#
# Environment (all optional):
#   CONFIG   config file (default configs/sdxl.py)
#   MESH     mesh shape (data, fsdp, tensor) (default "(1,-1,1)": FSDP over every local GPU)
#   PYTHON   interpreter with realisid-jax installed (default .venv/bin/python)
#   CUDA_VISIBLE_DEVICES  restricts the GPUs used, as usual
#   DRY_RUN=1 print the command instead of running it
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
WORKDIR=$1
shift
CONFIG=${CONFIG:-configs/sdxl.py}
MESH=${MESH:-(1,-1,1)}
PYTHON=${PYTHON:-.venv/bin/python}

# Let XLA take most of each GPU's memory up front (the default 75% wastes a quarter of an 80 GB card) and
# overlap FSDP all-gathers with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

cmd=("$PYTHON" -m realisid_jax.cli train --config "$CONFIG" --workdir "$WORKDIR"
     "--config.mesh.shape=${MESH}" --config.attention_impl=cudnn
     --config.dtype=bfloat16 --config.param_dtype=float32 "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
