#!/usr/bin/env bash
# Full-size SDXL RealisID sampling on one NVIDIA GPU, realisid-jax against PyTorch (python -m bench.gpu_sampling):
# makes its own virtual environment with JAX and PyTorch for CUDA and this checkout, then runs the bench under a
# time limit. Run from anywhere on the GPU machine:
#
#   bench/gpu_sampling.sh [bench.gpu_sampling ARGS]         e.g. --steps 30 --size 1024 --repeat 3
#
# Environment:
#   VENV          the environment to make or use (default .venv-gpu in the checkout)
#   SKIP_INSTALL  1: install nothing, use VENV as it is (a machine without the package index, or a second run)
#   TIME_LIMIT    seconds the bench may run (default 470: under 8 minutes with the start-up; installing is not
#                 counted)
#
# JAX's CUDA 13 plugin (jax[cuda13], the project's pinned jax) matches PyTorch's PyPI wheels (torch 2.13.0 is built
# for CUDA 13), so both load one set of NVIDIA libraries; the driver must support CUDA 13 (nvidia-smi, "CUDA
# Version" 13.0 or later). Figures go to docs/benchmarks.md with the device named.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
TIME_LIMIT=${TIME_LIMIT:-470}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  jax_version=$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' pyproject.toml)
  torch_version=$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "jax[cuda13]==${jax_version}" "torch==${torch_version}" -e ".[torch]"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
HF_HUB_OFFLINE=1 exec timeout --signal=INT --kill-after=20 "$TIME_LIMIT" "$VENV/bin/python" -m bench.gpu_sampling "$@"
