"""Test set-up: 8 simulated CPU devices for every sharded path, and no model hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Must run before any backend use: every sharded path is tested on (1), (8,1,1), (2,4,1), (2,2,2).
jax.config.update("jax_num_cpu_devices", 8)
