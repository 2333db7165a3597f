"""Benchmarks of realisid-jax against the PyTorch (diffusers) reference: ``python -m bench.run``.

PyTorch's OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set here, before any bench module
imports torch, unless the environment sets it): on a shared, oversubscribed machine its default spin-waiting
made the tiny step 50-100x slower, which measures the load, not the framework.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
