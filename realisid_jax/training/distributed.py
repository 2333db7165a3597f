"""Multi-process start-up: ``jax.distributed.initialize`` when the launcher asks for it.

Environment (read before any JAX backend use, so call :func:`maybe_initialize` first thing):

* ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``:
  explicit set-up, e.g. GPU hosts started by hand or the localhost multi-process test. The count and the
  index may be left out where JAX detects them (SLURM, Open MPI, Kubernetes).
* ``REALISID_DISTRIBUTED=1``: auto-detected set-up with no arguments; Cloud TPU pod slices (the TPU
  metadata server gives the coordinator, the count and each worker's index). ``launch/tpu_pod.sh`` sets it.

With neither set the run is single-process (all local devices), and nothing is initialised.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize(environ: dict[str, str] | None = None) -> bool:
    """Initialises ``jax.distributed`` per the environment above; returns whether it did.

    Raises:
      ValueError: ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set but not integers.
    """
    env = os.environ if environ is None else environ
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=None if count is None else int(count),
                                   process_id=None if index is None else int(index))
        return True
    if env.get("REALISID_DISTRIBUTED", "0") not in ("", "0"):
        jax.distributed.initialize()
        return True
    return False
