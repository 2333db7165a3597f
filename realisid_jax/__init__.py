"""realisid-jax: RealisID (arXiv 2412.16832) identity customisation on SDXL, in JAX/Flax NNX."""

import flax as _flax

# Variables are created unsharded and placed by `sharding.state_shardings` (eval_shape first, then each
# tensor straight onto its sharding); flax 0.12's eager sharding would need a mesh at construction.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
